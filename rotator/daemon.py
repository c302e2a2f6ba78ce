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
import dataclasses
import errno
import functools
import gc
import hashlib
import os
import resource
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from rotator import __version__, activation, printer
from rotator import takeover as takeover_
from rotator.admin import make_app
from rotator.component import Component, RotationFailed, probe_socket, proxy_limits
from rotator.config import ComponentSpec, Config, ConfigError, apply_definition
from rotator.configfile import load
from rotator.events import Event, EventBus
from rotator.fleet import (
    ReloadPlan,
    ReloadRejected,
    keep_daemon_settings,
    plan_reload,
    reload_summary,
    rolling_order,
)
from rotator.health import HealthCheck
from rotator.history import EventLog
from rotator.instance import Instance, marked_processes
from rotator.metrics import Metrics
from rotator.ports import describe_holders, port_holders, probe_port
from rotator.proxy.protocol import Listener
from rotator.proxy.route import Route
from rotator.proxy.upstream import preconnect
from rotator.spawner import Spawner
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

# After handing over: how long an idle keep-alive client connection may stay before it is
# closed (it answers its next request with Connection: close before then).
HANDOFF_IDLE = 2.0
# Descriptor-table slots reserved at start-up (capped by RLIMIT_NOFILE). On Linux, growing
# the table of a process that has threads waits for an RCU grace period: each time the
# daemon's descriptors first passed 64, 128, 256... the event loop, and every request in
# flight, stopped for 10-20 ms (measured: the first switch's gap in the restart benchmark).
FD_TABLE_RESERVE = 4096
# An instance found from an earlier run must answer its health check within this to be adopted.
ADOPT_CHECK_TIMEOUT = 3.0
# Events that do not change what the state file records.
# Events the human log leaves out: state transitions repeat what the event before said,
# and a daemon record repeats a line the daemon printed itself.
QUIET_KINDS = frozenset({"state", "daemon"})
NO_STATE_CHANGE = frozenset(
    {
        "healthy",
        "waiting",
        "unhealthy",
        "backoff",
        "port",
        "verified",
        "start",
        "rotated",
        "daemon",
        "warmed",
    }
)


class DaemonError(Exception):
    """Startup failed for a reason the user can act on; the message says which."""


@dataclass(frozen=True)
class Reload:
    """A checked reload, ready to apply: the new config, the plan, the new listeners."""

    config: Config
    plan: ReloadPlan
    listeners: dict[str, Listener]


class Daemon:
    def __init__(
        self,
        config: Config,
        out: Callable[[str], None] | None = None,
        log_format: str = "human",
        inherited: dict[str, socket.socket] | None = None,
        takeover: takeover_.Handover | None = None,
    ) -> None:
        self.config = config
        # Set when taking over from a running daemon: its sockets, token and connection.
        self._handover = takeover
        # False only while taking over, until the old daemon let go: a failed start must
        # then leave the instances (which the old daemon still owns) alone.
        self._owns_instances = takeover is None
        # Hands this daemon's sockets to a successor; knows its pid once it has.
        self._takeover_listener = takeover_.SuccessorListener(self, config.state_dir)
        self._admin_socket: socket.socket | None = None
        # Listening sockets from socket activation, by name, until a listener takes them.
        self.inherited = dict(inherited or {})
        self.bus = EventBus()
        self.components: dict[str, Component] = {}
        self.listeners: dict[str, Listener] = {}
        write = out or _print
        self.json_log = log_format == "json"
        # In JSON, the daemon's own lines become records too: one format per stream.
        self.out = (lambda line: write(printer.json_line(None, line))) if self.json_log else write
        self._write_log = write
        self.history = EventLog(config.state_dir / "events.log")
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
        self._reloading = False
        self._background: set[asyncio.Future[None]] = set()  # SIGHUP reloads
        # Starts every instance, so that the event loop never waits for a process to start.
        self.spawner = Spawner()
        self.bus.subscribe(self._on_event)
        # Subscribed from the start, so the lifecycle counts miss no event.
        self.metrics = Metrics(self, self.bus)

    # -- lifecycle ------------------------------------------------------------
    async def serve(self, shutdown_trigger: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.event_loop = type(loop).__module__.split(".")[0]
        self._shutdown = shutdown_trigger or asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        await self.spawner.start()
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
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._stop_everything()
            await self.spawner.close()
        if not startup.cancelled() and startup.exception() is not None:
            raise startup.exception()  # type: ignore[misc]

    def request_shutdown(self) -> None:
        if self._shutdown is not None:
            self._shutdown.set()

    async def _startup(self) -> None:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            if self._handover is None:  # taking over: the old daemon holds it until it exits
                self._lock.acquire()
        except AlreadyRunning as exc:
            raise DaemonError(
                f"rotator is already running for {config.path} (pid {exc.pid or 'unknown'}); "
                "stop it with: rotator down"
            ) from None
        # Only under the lock: the history file has one writer.
        self.bus.history.extend(self.history.load(self.bus.history.maxlen or 0))
        self.bus.subscribe(self.history.append)
        self.bus.publish(
            Event(
                "",
                "daemon",
                f"rotator {__version__} starting (pid {os.getpid()})",
                {"pid": os.getpid()},
            )
        )
        self._claim_inherited()
        for spec in config.components:
            await self._add_component(spec)
        # A successor keeps the token: CLI calls in flight still reach one of the two.
        token = self._handover.token if self._handover else secrets.token_urlsafe(32)
        await self._start_admin(token)
        # Only once the admin address is ours: a second daemon must not replace the token.
        write_private(config.token_path, token)
        self.out(
            f"rotator {__version__}: admin on http://{config.admin.listen}, "
            f"{len(self.components)} component(s), event loop {self.event_loop}"
        )
        state = self._load_state()
        kept = await self._adopt(state)
        if self._handover is None:
            await self._stop_leftovers(state, kept)
        else:
            await self._take_over()
        self._save()
        skip = {
            name
            for name, c in self.components.items()
            if c.active is not None or c.stopped_on_purpose
        }
        await self._in_dependency_order(self._start_one, skip)
        self.ready = True
        # What exists now (modules, the config, components) lives as long as the daemon:
        # out of the collector's sight, a full collection no longer walks it, which had
        # paused the event loop, and with it every request, for ~15 ms each time.
        gc.freeze()
        self._takeover_listener.start()
        running = sum(c.state == "running" for c in self.components.values())
        failed = [c.name for c in self.components.values() if c.state == "failed"]
        self.out(
            f"rotator: {running} of {len(self.components)} component(s) running"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )

    async def _add_component(self, spec: ComponentSpec) -> None:
        self._make_component(spec, await self._bind(spec))

    async def _bind(self, spec: ComponentSpec) -> Listener:
        """The component's public listener, bound (DaemonError when it cannot be)."""
        route = Route(spec.name, spec.hold_timeout, proxy_limits(spec))
        listener = Listener(route, spec.listen.host, spec.listen.port, spec.keepalive_timeout)
        try:
            await listener.start(self.inherited.pop(spec.name, None))
        except OSError as exc:
            raise DaemonError(
                _bind_error(f"components.{spec.name}.listen", str(spec.listen), exc)
            ) from None
        return listener

    def _claim_inherited(self) -> None:
        """Keep the activated sockets that belong to components; the rest are closed."""
        try:
            self.inherited, warnings = activation.assign(self.inherited, self.config.components)
        except activation.ActivationError as exc:
            raise DaemonError(str(exc)) from None
        for warning in warnings:
            self.out(f"rotator: warning: {warning}")
        for name, sock in self.inherited.items():
            self.out(f"{name}: serving on the activated socket fd {sock.fileno()}")

    def _make_component(self, spec: ComponentSpec, listener: Listener) -> None:
        self.listeners[spec.name] = listener
        self.components[spec.name] = Component(
            spec,
            listener.route,
            self.bus,
            health=HealthCheck(spec.health),
            log_dir=self.config.log_dir(spec.name),
            probe=probe_port,
            socket_probe=probe_socket,
            marker_scope=self.scope,
            warm=preconnect,
            spawn=functools.partial(Instance.spawn, spawner=self.spawner),
        )

    async def _start_admin(self, token: str) -> None:
        listen = self.config.admin.listen
        app = make_app(self, token)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        inherited = self._handover.admin if self._handover else None
        try:
            if inherited is not None and activation.serves(inherited, listen):
                self._admin_socket = inherited
            else:
                family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
                self._admin_socket = socket.create_server((listen.host, listen.port), family=family)
            # Our own socket, not aiohttp's: a successor daemon is handed it.
            await web.SockSite(self._runner, self._admin_socket).start()
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
        for task in self._background:
            task.cancel()
        self._takeover_listener.cancel()
        if self._takeover_listener.successor is not None or not self._owns_instances:
            await self._let_go()
            return
        if self.components:
            self.out("rotator: shutting down: no new connections, finishing requests in flight")
        deadline = max((spec.drain_timeout for spec in self.config.components), default=0.0)
        await asyncio.gather(*(listener.shutdown(deadline) for listener in self.listeners.values()))

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
        if self._can_save:  # a daemon that got as far as reading its state
            self.bus.publish(Event("", "daemon", "rotator stopped", {"pid": os.getpid()}))

    async def _release(self, keep_token: bool = False) -> None:
        for listener in self.listeners.values():
            listener.stop_accepting()
        self._takeover_listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
            if not keep_token:
                with contextlib.suppress(FileNotFoundError):
                    self.config.token_path.unlink()
        self._lock.release()
        self.history.close()

    # -- takeover: taking the running daemon's sockets (the old side is in takeover.py) ---
    async def _take_over(self) -> None:
        """The successor's side, once it adopted what runs: tell the old daemon to let go;
        then this daemon owns the instances, and the lock once the old one has exited."""
        assert self._handover is not None
        handover, self._handover = self._handover, None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, handover.ready)
        except (OSError, takeover_.TakeoverError) as exc:
            raise DaemonError(f"takeover failed: the old daemon did not let go: {exc}") from None
        self._owns_instances = True
        self.out(f"rotator: took over from pid {handover.old_pid}")
        task = asyncio.ensure_future(self._acquire_lock_eventually())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _acquire_lock_eventually(self) -> None:
        while True:
            try:
                self._lock.acquire()
                return
            except AlreadyRunning:
                await asyncio.sleep(0.1)  # the old daemon is still finishing its requests

    # -- takeover.Incumbent: what this daemon's SuccessorListener may ask of it ---------
    @property
    def reloading(self) -> bool:
        return self._reloading

    def listening_fds(self) -> dict[str, int]:
        return {name: listener.fileno() for name, listener in self.listeners.items()}

    def admin_fd(self) -> int:
        assert self._admin_socket is not None
        return self._admin_socket.fileno()

    def admin_token(self) -> str:
        return self.config.token_path.read_text().strip()

    async def quiesce(self) -> None:
        """Let rotations in progress end (bounded), then stop supervising."""
        deadline = time.monotonic() + takeover_.QUIESCE_TIMEOUT
        while any(c.busy for c in self.components.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for comp in self.components.values():
            comp.suspend()

    def save_last(self) -> None:
        self._save()
        self._can_save = False  # the successor owns the state file now

    def resume(self) -> None:
        self._can_save = True
        for comp in self.components.values():
            comp.resume()

    async def stop_accepting(self) -> None:
        for listener in self.listeners.values():
            listener.stop_accepting()
        if self._runner is not None:
            for site in self._runner.sites:
                await site.stop()

    async def _let_go(self) -> None:
        """Exit without stopping instances: handed over (finish the requests in flight,
        and the stops of replaced instances already begun), or a takeover that failed
        before the old daemon let go (which still owns everything)."""
        deadline = max((spec.drain_timeout for spec in self.config.components), default=0.0)
        await asyncio.gather(
            *(ls.shutdown(deadline, idle_grace=HANDOFF_IDLE) for ls in self.listeners.values()),
            *(c.finish_draining() for c in self.components.values()),
        )
        for comp in self.components.values():
            comp.suspend()
        await self._release(keep_token=True)
        successor = self._takeover_listener.successor
        if successor is not None:
            self.bus.publish(
                Event("", "daemon", f"handed over to pid {successor}", {"pid": os.getpid()})
            )
            self.out("rotator: stopped; the instances run on under the new daemon")

    # -- fleet operations ---------------------------------------------------------------
    async def restart_many(self, names: Sequence[str] | None, parallel: int = 1) -> dict[str, Any]:
        """Rotate `names` (None: every component not stopped on purpose) in dependency
        order, at most `parallel` at once, each after the ones it depends on; after the
        first failure nothing more is begun. A summary of what was and was not done."""
        if names is None:
            skipped = [n for n, c in self.components.items() if c.stopped_on_purpose]
            names = [n for n in self.components if n not in skipped]
        else:
            skipped = []
        order = rolling_order(self.config, names)
        slots = asyncio.Semaphore(max(1, parallel))
        done: dict[str, asyncio.Future[bool]] = {
            n: asyncio.get_running_loop().create_future() for n in order
        }
        restarted: list[str] = []
        failed: dict[str, str] = {}
        log_tails: dict[str, list[str]] = {}

        async def one(name: str) -> None:
            comp = self.components.get(name)
            deps = [done[d] for d in comp.spec.depends_on if d in done] if comp else []
            ok = all(await asyncio.gather(*deps))
            async with slots:
                # A reload may have removed it meanwhile: then there is nothing to restart.
                comp = self.components.get(name)
                if comp is not None and ok and not failed:
                    try:
                        await comp.rotate()
                        restarted.append(name)
                    except RotationFailed as exc:
                        failed[name] = exc.reason
                        log_tails[name] = exc.log_tail
            done[name].set_result(name in restarted)

        await asyncio.gather(*(one(n) for n in order))
        return {
            "result": "failed" if failed else "ok",
            "restarted": restarted,
            "failed": failed,
            "not_restarted": [n for n in order if n not in restarted and n not in failed],
            "skipped": skipped,
            "log_tail": log_tails,  # the failed new instance's last log lines
        }

    async def prepare_reload(self) -> Reload:
        """Read and check the config file again and bind any new public address.
        ReloadRejected (with every problem) changes nothing."""
        if self._reloading:
            raise ReloadRejected(["a reload is already in progress"])
        if any(c.suspended for c in self.components.values()):
            raise ReloadRejected(["a new rotator daemon is taking over; reload it instead"])
        self._reloading = True
        try:
            return await self._prepare_reload()
        except BaseException:
            self._reloading = False
            raise

    async def _prepare_reload(self) -> Reload:
        loop = asyncio.get_running_loop()
        try:
            new = await loop.run_in_executor(None, load, self.config.path)
        except ConfigError as exc:
            raise ReloadRejected([str(p) for p in exc.problems]) from None
        new = keep_daemon_settings(self.config, new)
        plan = plan_reload(self.config, new)
        bound: dict[str, Listener] = {}
        try:
            for name in plan.added + plan.rebound:
                bound[name] = await self._bind(new.component(name))
        except DaemonError as exc:
            for listener in bound.values():
                await listener.shutdown(0)
            raise ReloadRejected([str(exc)]) from None
        return Reload(new, plan, bound)

    async def apply_reload(self, reload: Reload) -> dict[str, Any]:
        """Carry out a prepared reload: in-place updates, new components started, changed
        ones rotated one at a time in dependency order (stopping at the first failure:
        the rest keep their running definition and a later reload tries again), removed
        ones drained and stopped and their addresses released."""
        try:
            return await self._apply_reload(reload)
        finally:
            self._reloading = False

    async def _apply_reload(self, reload: Reload) -> dict[str, Any]:
        new, plan = reload.config, reload.plan
        for note in plan.ignored:
            self.out(f"rotator: reload: {note}")
        for name in plan.updated:
            spec = new.component(name)
            await self.components[name].reconfigure(spec, rotate=False)
            self.listeners[name].keepalive_timeout = spec.keepalive_timeout
        # Moved ones: the old address serves on until the new one has started.
        moved = [self._detach(name) for name in plan.rebound]
        for name, listener in reload.listeners.items():
            self._make_component(new.component(name), listener)
        started = set(plan.added + plan.rebound)
        await self._in_dependency_order(self._start_one, skip=set(self.components) - started)
        failed = {n: self.components[n].last_error or "failed" for n in started}
        failed = {n: why for n, why in failed.items() if self.components[n].state == "failed"}
        rotated: list[str] = []
        for name in plan.rotated:
            if failed:
                break
            try:
                await self._reconfigure(self.components[name], new.component(name))
                rotated.append(name)
            except RotationFailed as exc:
                failed[name] = exc.reason
        gone = [self._detach(name) for name in plan.removed] + moved
        await asyncio.gather(*(self._retire(comp, listener) for comp, listener in gone))
        # In the file's order; what failed to rotate keeps the definition it runs.
        self.components = {n: self.components[n] for n in new.names if n in self.components}
        self.listeners = {n: self.listeners[n] for n in self.components}
        self.config = dataclasses.replace(
            new, components=tuple(c.config_spec for c in self.components.values())
        )
        self._save_soon()
        return {
            "result": "failed" if failed else "ok",
            "added": list(plan.added),
            "removed": list(plan.removed),
            "rebound": list(plan.rebound),
            "rotated": rotated,
            "not_rotated": [n for n in plan.rotated if n not in rotated and n not in failed],
            "updated": list(plan.updated),
            "unchanged": list(plan.unchanged),
            "failed": failed,
            "ignored": list(plan.ignored),
        }

    async def _reconfigure(self, comp: Component, spec: ComponentSpec) -> None:
        """Rotate `comp` to a reloaded definition; its health check is the new one's
        only if the rotation succeeds."""
        health = comp.health
        if spec.health != comp.config_spec.health:
            comp.health = HealthCheck(spec.health)
        try:
            await comp.reconfigure(spec, rotate=True)
        except RotationFailed:
            comp.health = health
            raise

    def _detach(self, name: str) -> tuple[Component, Listener]:
        """Take a component out of the daemon (its name is free at once); it serves on
        until retired."""
        return self.components.pop(name), self.listeners.pop(name)

    async def _retire(self, comp: Component, listener: Listener) -> None:
        """Drain and stop a detached component, then close its public address."""
        await comp.shutdown()
        await listener.shutdown(comp.spec.drain_timeout)
        comp.emit("removed", f"removed; {comp.spec.listen} released")

    def _reload_on_signal(self) -> None:
        if not self.ready:
            self.out("rotator: SIGHUP ignored: still starting")
            return
        task = asyncio.ensure_future(self._reload_and_report())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_and_report(self) -> None:
        try:
            result = await self.apply_reload(await self.prepare_reload())
        except ReloadRejected as exc:
            self.out("rotator: reload rejected, nothing changed:")
            for problem in exc.problems:
                self.out(f"    {problem}")
            return
        self.out(f"rotator: reload {result['result']}: {reload_summary(result)}")

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
                name, r.port, r.pid, r.create_time, r.marker, r.started, comp.log_dir
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
                None,  # only stopped: its log is not read
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
        if self.json_log:
            self._write_log(printer.json_line(event.time, "", event.to_json()))
            return
        if event.kind in QUIET_KINDS:
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
    # asyncio's strerror repeats the address ("error while attempting to bind on address
    # ('127.0.0.1', 8001): address already in use"): the errno's own text says it once.
    message = f"{field}: cannot bind {address}: {os.strerror(exc.errno) if exc.errno else exc}"
    if exc.errno == errno.EADDRINUSE:
        port = int(address.rsplit(":", 1)[1])
        message += f" ({describe_holders(port, port_holders([port]))})"
    return message


def reserve_fd_table(size: int = FD_TABLE_RESERVE) -> None:
    """Make the descriptor table hold `size` descriptors now, while the process has one
    thread and growing it costs nothing: open one at the top slot and close it (the
    table never shrinks). A slot already in use is left alone."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = (size if soft == resource.RLIM_INFINITY else min(size, soft)) - 1
    if top < 3:
        return
    try:
        os.fstat(top)
        return  # in use (an inherited socket, say): the table is that large already
    except OSError:
        pass
    with contextlib.suppress(OSError):
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(fd, top, inheritable=False)
            os.close(top)
        finally:
            os.close(fd)


def run(config: Config, log_format: str = "human", takeover: bool = False) -> int:
    """Run the daemon in the foreground until it is told to stop; the exit code. With
    `takeover`, first take the sockets of the daemon running for this state_dir."""
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    reserve_fd_table()
    try:
        # Read (and unset) before anything starts an instance: they must not inherit it.
        inherited = activation.listen_fds(os.environ, os.getpid())
        handover = takeover_.request(config.state_dir) if takeover else None
        if handover is not None:
            inherited = activation.matching(handover.sockets, config.components)
        daemon = Daemon(config, inherited=inherited, log_format=log_format, takeover=handover)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(daemon.serve())
    except (DaemonError, activation.ActivationError, takeover_.TakeoverError) as exc:
        print(f"rotator: {exc}", file=sys.stderr)
        return 1
    return 0
