"""The daemon: the one place that builds the real, side-effecting objects.

serve() = startup, then wait for a shutdown request (signal or admin API),
then an ordered shutdown. Startup: make sure the state_dir is ours alone
(private.py), take its lock (one daemon per state_dir), bind the admin API,
bind every public address, read the state file, adopt the instances an
earlier daemon left running (identity: pid and create time; our user and
their marker; health-checked), stop whatever else that daemon left behind
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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiohttp import web

from rotator import __version__, activation, cgroups, printer, private
from rotator import notify as notify_
from rotator import takeover as takeover_
from rotator.admin import make_app
from rotator.adoption import EarlierRun
from rotator.component import Component, ComponentState, RotationFailed, probe_socket
from rotator.config import CanarySpec, ComponentSpec, Config
from rotator.events import Event, EventBus, Kind
from rotator.fleet import ReloadRejected, in_dependency_order
from rotator.health import HealthCheck
from rotator.history import EventLog
from rotator.instance import MARKER, Instance
from rotator.limits import Limits
from rotator.metrics import Metrics
from rotator.ports import describe_holders, port_holders, probe_port
from rotator.proxy.clients import UNLIMITED, Clients, accept_backlog, effective_total
from rotator.proxy.protocol import Listener
from rotator.proxy.route import Route
from rotator.proxy.upstream import preconnect
from rotator.reload import FleetOps, Reload
from rotator.spawner import Spawner
from rotator.state import (
    AlreadyRunning,
    DaemonLock,
    State,
    StateFile,
    StateTooNew,
    StateWriter,
    write_private,
)
from rotator.watcher import Watcher

# After handing over: how long an idle keep-alive client connection may stay before it is
# closed (it answers its next request with Connection: close before then).
HANDOFF_IDLE = 2.0
# Descriptor-table slots reserved at start-up (capped by RLIMIT_NOFILE). On Linux, growing
# the table of a process that has threads waits for an RCU grace period: each time the
# daemon's descriptors first passed 64, 128, 256... the event loop, and every request in
# flight, stopped for 10-20 ms (measured: the first switch's gap in the restart benchmark).
FD_TABLE_RESERVE = 4096
# How often running instances' log sizes are checked against `logs.max_size`: one stat
# per instance (a few microseconds); a file grows past max_size by at most what its
# instance writes in this time.
LOG_CHECK_INTERVAL = 1.0


# What to do about a state file someone else wrote (the daemon refuses to start).
STRANGE_STATE_FILE = "rotator did not write it; check it, then remove it"


class DaemonError(Exception):
    """Startup failed for a reason the user can act on; the message says which."""


class Daemon:
    def __init__(
        self,
        config: Config,
        out: Callable[[str], None] | None = None,
        log_format: str = "human",
        inherited: dict[str, socket.socket] | None = None,
        takeover: takeover_.Handover | None = None,
        child_fd_limit: int | None = None,
        notify_socket: str | None = None,
        watch: bool = True,
    ) -> None:
        """`notify_socket`: the service manager's NOTIFY_SOCKET (systemd's), if any."""
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
        self.bus = EventBus(on_error=self._listener_failed)
        self.components: dict[str, Component] = {}
        self.listeners: dict[str, Listener] = {}
        self._print_line = out or _print
        self._output_failed = False
        write = self._write_safely
        self.json_log = log_format == "json"
        # In JSON, the daemon's own lines become records too: one format per stream.
        self.out = (lambda line: write(printer.json_line(None, line))) if self.json_log else write
        self._write_log = write
        self.history = EventLog(config.state_dir / "events.log")
        self.event_loop = "asyncio"
        self.ready = False  # startup done: every component started, adopted or given up
        self.scope = hashlib.sha1(str(config.state_dir).encode()).hexdigest()[:10]
        self.state_file = StateFile(config.state_dir / "state.json")
        # The pathless reason: the temporary file's name would confuse.
        describe = functools.partial(printer.os_error, paths=False)
        self.state = StateWriter(self.state_file, self._snapshot, self.out, describe)
        self._lock = DaemonLock(config.state_dir / "daemon.lock")
        self._shutdown: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.ops = FleetOps(self)  # rolling restarts and reloads
        self._background: set[asyncio.Future[None]] = set()  # SIGHUP reloads
        # Starts every instance, so that the event loop never waits for a process to start;
        # instances get `child_fd_limit`, the descriptor limit rotator was started with.
        self.spawner = Spawner(child_fd_limit)
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cap, self._cap_warning = effective_total(config.max_clients, self.fd_limit)
        # Client connections over every listener, capped below the descriptor limit.
        self.clients = Clients(cap, report=self.out, backlog=accept_backlog(self.fd_limit))
        # A cgroup per instance where rotator may make one (Linux): see cgroups.py.
        self.cgroup_parent = cgroups.parent()
        # Two subscribers, so that saving never depends on printing.
        self.bus.subscribe(self._state_changed)
        self.bus.subscribe(self._print_event)
        # Subscribed from the start, so the lifecycle counts miss no event.
        self.metrics = Metrics(self, self.bus)
        # max_memory and restart_every, once startup is done (a takeover's included): it
        # reads the components afresh at every check.
        self.limits = Limits(lambda: self.components.values() if self.ready else (), out=self.out)
        # sd_notify both ways (notify.py): what instances say to us; what we say to systemd.
        self.instance_notify = notify_.NotifySocket(config.state_dir / "notify.sock", MARKER)
        self.service = notify_.ServiceManager(notify_socket, self.out)
        self.bus.subscribe(self._tell_service)
        # Restart on save; None with `up --no-watch`.
        self.watcher = Watcher(self.out) if watch else None

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
        rotating = asyncio.ensure_future(self._rotate_logs())
        limiting = asyncio.ensure_future(self.limits.run())
        try:
            await asyncio.wait({startup, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not startup.done():  # told to stop while still starting
                startup.cancel()
                await asyncio.gather(startup, return_exceptions=True)
            elif startup.exception() is None:
                await stopping
        finally:
            stopping.cancel()
            rotating.cancel()
            limiting.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._stop_everything()
            await self.spawner.close()
        if not startup.cancelled() and startup.exception() is not None:
            raise startup.exception()  # type: ignore[misc]

    async def _rotate_logs(self) -> None:
        """Every LOG_CHECK_INTERVAL, each component rotates its instances' outgrown logs."""
        while True:
            await asyncio.sleep(LOG_CHECK_INTERVAL)
            for comp in list(self.components.values()):
                await comp.rotate_logs()

    def request_shutdown(self) -> None:
        if self._shutdown is not None:
            self._shutdown.set()

    async def _startup(self) -> None:
        config = self.config
        try:
            notice = private.make_state_dir(config.state_dir)
            # The file that names processes to adopt: it must be ours too.
            private.check_file(self.state_file.path, "state file", STRANGE_STATE_FILE)
        except private.NotPrivate as exc:
            raise DaemonError(str(exc)) from None
        except OSError as exc:
            raise DaemonError(f"cannot use the state_dir: {printer.os_error(exc)}") from None
        if notice:
            self.out(f"rotator: {notice}")
        try:
            if self._handover is None:  # taking over: the old daemon holds it until it exits
                self._lock.acquire()
        except AlreadyRunning as exc:
            raise DaemonError(
                f"rotator is already running for {config.path} (pid {exc.pid or 'unknown'}); "
                "stop it with: rotator down"
            ) from None
        except OSError as exc:
            raise DaemonError(f"cannot use the state_dir: {printer.os_error(exc)}") from None
        # Only under the lock: the history file has one writer.
        self.bus.history.extend(self.history.load(self.bus.history.maxlen or 0))
        self.bus.subscribe(self.history.append)
        self.bus.publish(
            Event(
                "",
                Kind.DAEMON,
                f"rotator {__version__} starting (pid {os.getpid()})",
                {"pid": os.getpid()},
            )
        )
        self._claim_inherited()
        if self._handover is None:  # taking over: once the old daemon let go (it uses the path)
            self._open_notify_socket()
        for spec in config.components:
            await self._add_component(spec)
        # A successor keeps the token: CLI calls in flight still reach one of the two.
        token = self._handover.token if self._handover else secrets.token_urlsafe(32)
        await self._start_admin(token)
        # Only once the admin address is ours: a second daemon must not replace the token.
        try:
            write_private(config.token_path, token)
        except OSError as exc:
            raise DaemonError(f"cannot write the admin token: {printer.os_error(exc)}") from None
        limit = "unlimited" if self.fd_limit == resource.RLIM_INFINITY else self.fd_limit
        self.out(
            f"rotator {__version__}: admin on http://{config.admin.listen}, "
            f"{len(self.components)} component(s), event loop {self.event_loop}, "
            f"max_clients {self.clients.cap} (descriptor limit {limit}), "
            + (
                f"a cgroup per instance under {self.cgroup_parent}"
                if self.cgroup_parent
                else "no cgroups"
            )
        )
        if self._cap_warning:
            self.out(f"rotator: warning: {self._cap_warning}")
        earlier = EarlierRun(
            self.state_file, self.scope, self.components, self.out, self.cgroup_parent
        )
        try:
            state = earlier.load()
        except StateTooNew as exc:
            raise DaemonError(str(exc)) from None
        self.state.enable()
        kept = await earlier.adopt(state)
        if self._handover is None:
            await earlier.stop_leftovers(kept)
        else:
            await self._take_over()
        self.state.now()
        skip = {
            name
            for name, c in self.components.items()
            if len(c.serving) >= c.replicas or c.stopped_on_purpose
        }
        await self._in_dependency_order(self._start_one, skip)
        self.ready = True
        self._watch_files()
        # What exists now (modules, the config, components) lives as long as the daemon:
        # out of the collector's sight, a full collection no longer walks it, which had
        # paused the event loop, and with it every request, for ~15 ms each time.
        gc.freeze()
        self._takeover_listener.start()
        summary = self.summary()
        self.out(f"rotator: {summary}")
        self.service.send(READY=1, STATUS=summary)

    def summary(self) -> str:
        """One line: how many components run, which are degraded or failed."""
        running = sum(c.state is ComponentState.RUNNING for c in self.components.values())
        failed = [c.name for c in self.components.values() if c.state is ComponentState.FAILED]
        degraded = [
            f"{c.name} ({c.healthy} of {c.replicas} replicas)"
            for c in self.components.values()
            if c.state is ComponentState.DEGRADED
        ]
        return (
            f"{running} of {len(self.components)} component(s) running"
            + (f"; degraded: {', '.join(degraded)}" if degraded else "")
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )

    def _open_notify_socket(self) -> None:
        """The instances' NOTIFY_SOCKET; without it (a path too long, say) `ready: notify`
        waits for the first healthy probe instead, and the daemon says so."""
        sock = self.instance_notify
        try:
            sock.open()
        except OSError as exc:
            self.out(
                f"rotator: warning: no NOTIFY_SOCKET for instances ({sock.path}: "
                f"{exc.strerror or exc}); health.ready: notify polls instead"
            )

    def _tell_service(self, event: Event) -> None:
        """After start-up, STATUS= follows every change of a component's state."""
        if self.ready and event.kind == Kind.STATE and not self.ops.reloading:
            self.service.send(STATUS=self.summary())

    def reloading_changed(self, reloading: bool) -> None:
        """reload.Fleet: systemd's RELOADING=1 ... READY=1 around a reload."""
        if reloading:
            self.service.reloading()
        else:
            self.service.send(READY=1, STATUS=self.summary())

    async def _add_component(self, spec: ComponentSpec) -> None:
        self.add_component(spec, await self._bind(spec))

    async def _bind(self, spec: ComponentSpec) -> Listener:
        """The component's public listener, bound (DaemonError when it cannot be)."""
        route = Route(spec.name, limits=spec.proxy)
        listener = Listener(route, spec.listen.host, spec.listen.port, clients=self.clients)
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

    def add_component(self, spec: ComponentSpec, listener: Listener) -> None:
        self.listeners[spec.name] = listener
        self.components[spec.name] = Component(
            spec,
            listener.route,
            self.bus,
            health=self.health_check(spec),
            log_dir=self.config.log_dir(spec.name),
            probe=probe_port,
            socket_probe=probe_socket,
            marker_scope=self.scope,
            warm=preconnect,
            notify=self.instance_notify,
            spawn=functools.partial(
                Instance.spawn, spawner=self.spawner, cgroup_parent=self.cgroup_parent
            ),
        )

    def health_check(self, spec: ComponentSpec) -> HealthCheck:
        return HealthCheck(
            spec.health,
            spec,
            spawn=self.spawner.spawn,
            output_dir=self.config.state_dir / "health",
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
            await comp.start()  # the replicas not adopted
        except RotationFailed:
            return bool(comp.serving)  # some replicas serve: its dependents can start
        return True

    async def _in_dependency_order(
        self,
        action: Callable[[Component, bool], Awaitable[bool]],
        skip: Iterable[str] = (),
        reverse: bool = False,
    ) -> None:
        """Run `action` on every component once what it must follow is done: its
        dependencies when starting, its dependents when stopping."""
        skip, components = set(skip), self.components

        def after(name: str) -> Iterable[str]:
            if not reverse:
                return components[name].spec.depends_on
            return [n for n, c in components.items() if name in c.spec.depends_on]

        async def act(name: str, ok: bool) -> bool:
            return True if name in skip else await action(components[name], ok)

        await in_dependency_order(list(components), after, act)

    async def _stop_everything(self) -> None:
        for task in self._background:
            task.cancel()
        if self.watcher is not None:
            await self.watcher.close()
        self._takeover_listener.cancel()
        if self._takeover_listener.successor is not None or not self._owns_instances:
            await self._let_go()  # no STOPPING=1: the service goes on, under the new daemon
            return
        self.service.send(STOPPING=1, STATUS="stopping")
        if self.components:
            self.out("rotator: shutting down: no new connections, finishing requests in flight")
        deadline = max((spec.drain_timeout for spec in self.config.components), default=0.0)
        await asyncio.gather(*(listener.shutdown(deadline) for listener in self.listeners.values()))

        async def stop(comp: Component, _: bool) -> bool:
            await comp.shutdown()
            return True

        if self.components:
            await self._in_dependency_order(stop, reverse=True)
            await self.state.settled()
            self.state.now()
        await self._release()
        if self.components:
            self.out("rotator: stopped")
        if self.state.enabled:  # a daemon that got as far as reading its state
            self.bus.publish(Event("", Kind.DAEMON, "rotator stopped", {"pid": os.getpid()}))

    async def _release(self, keep_token: bool = False) -> None:
        self.state.close()
        for listener in self.listeners.values():
            listener.stop_accepting()
        self._takeover_listener.close()
        self.instance_notify.close()
        if self._runner is not None:
            await self._runner.cleanup()
            if not keep_token:
                with contextlib.suppress(OSError):  # a cleanup: it must not fail the shutdown
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
        self._open_notify_socket()  # the instances' messages come to us from now on
        # Before the old daemon exits (it finishes its requests first): systemd follows
        # the new main process instead of taking the old one's exit for the service's.
        self.service.send(MAINPID=os.getpid(), STATUS=f"took over from pid {handover.old_pid}")
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
        return self.ops.reloading

    def listening_fds(self) -> dict[str, int]:
        return {name: listener.fileno() for name, listener in self.listeners.items()}

    def admin_fd(self) -> int:
        assert self._admin_socket is not None
        return self._admin_socket.fileno()

    def admin_token(self) -> str:
        return self.config.token_path.read_text().strip()

    def service_notify_socket(self) -> str | None:
        return self.service.address

    async def quiesce(self) -> None:
        """Let rotations in progress end (bounded), then stop supervising."""
        deadline = time.monotonic() + takeover_.QUIESCE_TIMEOUT
        while any(c.busy for c in self.components.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for comp in self.components.values():
            comp.suspend()

    def save_last(self) -> None:
        self.state.now()
        self.state.enable(False)  # the successor owns the state file now

    def resume(self) -> None:
        self.state.enable()
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
                Event("", Kind.DAEMON, f"handed over to pid {successor}", {"pid": os.getpid()})
            )
            self.out("rotator: stopped; the instances run on under the new daemon")

    # -- admin.Control: what the admin API may ask of this daemon --------------------------
    async def restart(self, names: Sequence[str] | None, parallel: int = 1) -> dict[str, Any]:
        return await self.ops.restart_many(names, parallel)

    async def start(self, name: str) -> None:
        await self.components[name].start()

    async def stop(self, name: str, force: bool) -> None:
        await self.components[name].stop(force=force)

    async def deploy(self, name: str, spec: ComponentSpec) -> None:
        await self.components[name].deploy(spec)

    async def rollback(self, name: str) -> None:
        await self.components[name].rollback()

    async def scale(self, name: str, replicas: int) -> None:
        await self.components[name].scale(replicas)

    async def canary(self, name: str, spec: ComponentSpec, weight: int, rule: CanarySpec) -> None:
        await self.components[name].deploy_canary(spec, weight, rule)

    async def promote(self, name: str) -> None:
        await self.components[name].promote()

    async def prepare_reload(self) -> Reload:
        return await self.ops.prepare_reload()

    async def apply_reload(self, reload: Reload) -> dict[str, Any]:
        return await self.ops.apply_reload(reload)

    async def settled(self) -> str | None:
        return await self.state.settled()

    def exposition(self) -> bytes:
        return self.metrics.exposition()

    # -- reload.Fleet: what fleet operations (reload.py) may ask of this daemon ---------
    async def bind(self, spec: ComponentSpec) -> Listener:
        try:
            return await self._bind(spec)
        except DaemonError as exc:
            raise ReloadRejected([str(exc)]) from None

    async def start_components(self, names: set[str]) -> None:
        await self._in_dependency_order(self._start_one, skip=set(self.components) - names)

    def reconfigured(self, config: Config) -> None:
        cap, warning = effective_total(config.max_clients, self.fd_limit)
        if warning:
            self.out(f"rotator: reload: warning: {warning}")
        if cap != self.clients.cap:
            self.out(f"rotator: reload: max_clients {self.clients.cap} -> {cap}")
            self.clients.cap = cap
        self.config = config
        self._watch_files()
        self.state.soon()

    def _watch_files(self) -> None:
        """Restart on save follows the components' `watch` (started once all are up)."""
        if self.watcher is not None:
            self.watcher.configure(self.components)
        elif watching := [c.name for c in self.components.values() if c.config_spec.watch.paths]:
            self.out(f"rotator: --no-watch: not watching the files of {', '.join(watching)}")

    def _reload_on_signal(self) -> None:
        if not self.ready:
            self.out("rotator: SIGHUP ignored: still starting")
            return
        task = asyncio.ensure_future(self.ops.reload_and_report())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- state ------------------------------------------------------------------------
    def _state_changed(self, event: Event) -> None:
        if Kind(event.kind).saves:
            self.state.soon()

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
                "state_file_error": self.state.error,
            },
            "components": [c.status() for c in self.components.values()],
        }

    def _write_safely(self, line: str) -> None:
        """The log must never take the daemon down: once a write fails (`rotator up |
        head -1`: EPIPE at the next line), printing stops, saying so once on stderr and
        in the history; events.log and the state file go on."""
        if self._output_failed:
            return
        try:
            self._print_line(line)
        except (OSError, ValueError) as exc:  # ValueError: a closed file
            self._output_failed = True
            if self._print_line is _print:
                printer.silence_stdout()
            message = (
                f"stdout failed ({printer.error_text(exc)}): no more output there; "
                f"events go on to {self.history.path}"
            )
            with contextlib.suppress(OSError, ValueError):
                print(f"rotator: {message}", file=sys.stderr, flush=True)
            self.bus.publish(Event("", Kind.DAEMON, message))

    def _listener_failed(self, listener: Callable[[Event], None], exc: Exception) -> None:
        name = getattr(listener, "__qualname__", type(listener).__name__)
        self.out(
            f"rotator: warning: event listener {name} failed ({printer.error_text(exc)}); "
            "it stays subscribed (reported once)"
        )

    def _print_event(self, event: Event) -> None:
        if self.json_log:
            self._write_log(printer.json_line(event.time, "", event.to_json()))
            return
        if Kind(event.kind).quiet:
            return
        stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
        self.out(f"{stamp} {event.component}: {event.message}")
        for line in event.data.get("log_tail", []):
            self.out(f"    | {line}")


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


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as Go's runtime does at start: a
    proxy's descriptors are its capacity, and the usual soft limit of 1024 is a relic of
    select(). Where the hard limit itself is refused (macOS, whose hard limit is often
    unlimited, allows no more than kern.maxfilesperproc), the largest accepted of halving
    steps down from it. Returns the soft limit rotator was started with: its instances
    get that one back (spawner_process.py), as systemd does for the services it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    want = UNLIMITED if hard == resource.RLIM_INFINITY else hard
    while want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            break
        except (ValueError, OSError):
            want //= 2
    return soft


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


def run(
    config: Config, log_format: str = "human", takeover: bool = False, watch: bool = True
) -> int:
    """Run the daemon in the foreground until it is told to stop; the exit code. With
    `takeover`, first take the sockets of the daemon running for this state_dir; without
    `watch` (`up --no-watch`), no component restarts on save."""
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    started_with = raise_fd_limit()
    reserve_fd_table()
    try:
        # Read (and unset) before anything starts an instance: they must not inherit it.
        inherited = activation.listen_fds(os.environ, os.getpid())
        # The service manager's, ours alone: instances get the daemon's own (notify.py).
        notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
        if takeover and config.state_dir.is_dir():  # only ours may hand us sockets
            private.check_dir(config.state_dir, "state_dir")
        handover = takeover_.request(config.state_dir) if takeover else None
        if handover is not None:
            inherited = activation.matching(handover.sockets, config.components)
            # Started by hand: the old daemon's service manager becomes ours (MAINPID=).
            notify_socket = notify_socket or handover.notify_socket
        daemon = Daemon(
            config,
            inherited=inherited,
            log_format=log_format,
            takeover=handover,
            child_fd_limit=started_with,
            notify_socket=notify_socket,
            watch=watch,
        )
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(daemon.serve())
    except (
        DaemonError,
        activation.ActivationError,
        takeover_.TakeoverError,
        private.NotPrivate,
    ) as exc:
        print(f"rotator: {exc}", file=sys.stderr)
        return 1
    return 0
