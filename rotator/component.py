"""The rotation of one component: start, rotate, stop.

A rotation is: choose a port, spawn, wait until healthy, switch the route,
then (outside the lock) drain the replaced instance and stop its tree. A
failed start leaves the route and the old instance untouched. One lock covers
spawn to switch, so rotations of a component never interleave; draining the
replaced instance happens after the lock is released, so a slow drain does
not hold the next rotation back.

The side effects (spawning, health checks, port probes) come in as objects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rotator.config import ComponentSpec
from rotator.events import Event, EventBus
from rotator.health import NotHealthy
from rotator.instance import Instance, SpawnError
from rotator.ports import NoFreePort, PortState, choose_port, describe_exhausted, port_holders
from rotator.proxy.route import Route, Target

Spawner = Callable[[str, int, list[str], dict[str, str], Path, Path], Awaitable[Instance]]
Probe = Callable[[str, int], PortState]


class HealthGate(Protocol):
    async def wait_until_healthy(self, host: str, port: int, exited: Awaitable[int]) -> float: ...


LOG_TAIL = 20


class RotationFailed(Exception):
    def __init__(self, reason: str, log_tail: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail or []


@dataclass
class Draining:
    instance: Instance
    target: Target


def instance_host(listen_host: str) -> str:
    """Where instances listen: the public host, or loopback when that is a wildcard."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(listen_host, listen_host)


class Component:
    def __init__(
        self,
        spec: ComponentSpec,
        route: Route,
        bus: EventBus,
        *,
        health: HealthGate,
        log_path: Path,
        spawn: Spawner = Instance.spawn,
        probe: Probe,
    ) -> None:
        self.spec = spec
        self.route = route
        self.bus = bus
        self.health = health
        self.log_path = log_path
        self._spawn = spawn
        self._probe = probe
        self.host = instance_host(spec.listen.host)
        self.state = "stopped"
        self.active: Instance | None = None
        self.draining: list[Draining] = []
        self.restarts = 0
        self.last_port: int | None = None
        self.last_error: str | None = None
        self.last_stop: str | None = None
        self.last_rotation: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return self.spec.name

    def emit(self, kind: str, message: str, **data: Any) -> None:
        self.bus.publish(Event(self.name, kind, message, data))

    # -- operations ---------------------------------------------------------
    async def rotate(self) -> None:
        """Start a new instance and make it the active one; the replaced one is
        drained and stopped before this returns. Raises RotationFailed."""
        if self._lock.locked():
            self.emit("waiting", "waiting for the rotation in progress")
        began = time.monotonic()
        async with self._lock:
            replacing = self.active is not None
            self._set_state("rotating" if replacing else "starting")
            try:
                new = await self._launch()
            except RotationFailed as exc:
                self.last_error = exc.reason
                self._set_state("running" if self.active is not None else "failed")
                self.emit("failed", exc.reason, log_tail=exc.log_tail)
                raise
            old = self._switch(new)
            self.last_error = None
            if replacing:
                self.restarts += 1
            self._set_state("running")
        if old is not None:
            await self._retire_soon(old)
        self.last_rotation = {"at": time.time(), "seconds": round(time.monotonic() - began, 3)}

    async def stop(self) -> None:
        """Take the component out of service: drain and stop every instance."""
        async with self._lock:
            old = self._drop_active(self.route.swap(None))
            self._set_state("stopped")
        if old is not None:
            await self._retire_soon(old)
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for watcher in self._watchers:
            watcher.cancel()

    # -- steps ---------------------------------------------------------------
    async def _launch(self) -> Instance:
        spec = self.spec
        in_use = {d.instance.port for d in self.draining}
        if self.active is not None:
            in_use.add(self.active.port)
        try:
            choice = choose_port(
                spec.ports, self.last_port, in_use, lambda p: self._probe(self.host, p)
            )
        except NoFreePort:
            raise RotationFailed(describe_exhausted(spec.ports, port_holders(spec.ports))) from None
        port = choice.port
        self.last_port = port
        if choice.state is PortState.TIME_WAIT:
            self.emit(
                "port",
                f"every free port of the pool has TIME_WAIT left; using {port}, which SO_REUSEADDR accepts",
            )
        argv, env = spec.render(port, self.host)
        try:
            inst = await self._spawn(self.name, port, argv, env, spec.cwd, self.log_path)
        except SpawnError as exc:
            raise RotationFailed(str(exc)) from None
        self.emit("spawned", f"started pid {inst.pid} on port {port}", pid=inst.pid, port=port)
        try:
            seconds = await self.health.wait_until_healthy(self.host, port, inst.wait())
        except NotHealthy as exc:
            await inst.stop(spec.stop_signal, spec.stop_timeout)
            raise RotationFailed(
                f"new instance pid {inst.pid} on port {port} {exc}", inst.tail(LOG_TAIL)
            ) from None
        except asyncio.CancelledError:
            # Shutdown during a start: nobody else knows this instance yet.
            await asyncio.shield(inst.stop(spec.stop_signal, spec.stop_timeout))
            raise
        self.emit(
            "healthy",
            f"pid {inst.pid} healthy after {seconds * 1000:.0f} ms",
            pid=inst.pid,
            ms=round(seconds * 1000),
        )
        return inst

    def _switch(self, new: Instance) -> Draining | None:
        target = Target(self.host, new.port, label=f"{self.name}[{new.pid} :{new.port}]")
        old_target = self.route.swap(target)
        old = self._drop_active(old_target)
        self.active = new
        watcher = asyncio.get_running_loop().create_task(self._watch(new))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        was = f":{old.instance.port} -> " if old is not None else ""
        self.emit(
            "switched",
            f"switched {was}:{new.port} (pid {new.pid})",
            pid=new.pid,
            port=new.port,
            in_flight=old_target.in_flight if old_target is not None else 0,
        )
        return old

    def _drop_active(self, target: Target | None = None) -> Draining | None:
        inst, self.active = self.active, None
        if inst is None:
            return None
        inst.stopping = True
        draining = Draining(inst, target or Target(self.host, inst.port))
        self.draining.append(draining)
        return draining

    async def _retire_soon(self, old: Draining) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        await asyncio.shield(task)

    async def _retire(self, old: Draining) -> None:
        spec, inst, target = self.spec, old.instance, old.target
        target.retire()
        in_flight = target.in_flight
        began = time.monotonic()
        left = await target.drain(spec.drain_timeout)
        took = time.monotonic() - began
        if left:
            target.close_all()
            self.emit(
                "drained",
                f"drain_timeout {spec.drain_timeout:g}s passed with {left} request(s) of pid {inst.pid} in flight: cut",
                pid=inst.pid,
                cut=left,
            )
        else:
            self.emit(
                "drained",
                f"drained {in_flight} request(s) from pid {inst.pid} in {took:.2f} s",
                pid=inst.pid,
                requests=in_flight,
                seconds=round(took, 3),
            )
        result = await inst.stop(spec.stop_signal, spec.stop_timeout)
        self.last_stop = result.outcome
        if result.survivors:
            self.emit(
                "stopped",
                f"pid {inst.pid}: processes {list(result.survivors)} survived SIGKILL",
                pid=inst.pid,
            )
        else:
            self.emit(
                "stopped",
                f"stopped pid {inst.pid} ({result.outcome}, {result.seconds * 1000:.0f} ms)",
                pid=inst.pid,
                outcome=result.outcome,
            )
        self.draining.remove(old)

    async def _watch(self, inst: Instance) -> None:
        code = await inst.wait()
        if inst is not self.active or inst.stopping:
            return
        # Crash supervision (restart with backoff) builds on this; for now the
        # component is marked failed and its public address answers 503.
        self.active = None
        self.route.swap(None)
        self.last_error = f"pid {inst.pid} exited with code {code}"
        self.emit("exited", self.last_error, pid=inst.pid, code=code, log_tail=inst.tail(LOG_TAIL))
        self._set_state("failed")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            was, self.state = self.state, state
            self.emit("state", f"{was} -> {state}", was=was, now=state)

    # -- reporting -----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        active = self.active
        return {
            "name": self.name,
            "listen": str(self.spec.listen),
            "state": self.state,
            "active": None
            if active is None
            else {
                "pid": active.pid,
                "port": active.port,
                "healthy": active.returncode is None,
                "since": active.started,
            },
            "draining": [
                {"pid": d.instance.pid, "port": d.instance.port, "in_flight": d.target.in_flight}
                for d in self.draining
            ],
            "restarts": self.restarts,
            "requests": self.route.requests,
            "in_flight": sum(t.in_flight for t in self._targets()),
            "last_rotation": self.last_rotation,
            "last_stop": self.last_stop,
            "last_error": self.last_error,
        }

    def _targets(self) -> list[Target]:
        current = [self.route.target] if self.route.target is not None else []
        return current + [d.target for d in self.draining]
