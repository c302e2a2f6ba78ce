"""The life of one component: start, rotate, deploy, roll back, scale, supervise, stop, adopt.

A component runs `replicas` instances, each filling a slot (0 .. replicas-1), all in
its Route's balancing set. Replacing the instance of a slot is: choose a port, spawn,
wait until healthy, check that the socket listening on the port is the new
instance's own (anyone may bind a port before a slow app does and answer its health
check), put it in the balancing set and take the old one out in the same step,
optionally verify the new instance for a while (putting the old one, still running,
back when it fails), then drain the old one and stop its tree. A rotation does that
slot by slot, so the set never holds fewer instances than before; it waits for each
old instance to stop before the next slot (its port is then free for the next new
one: a pool of replicas + 1 ports suffices), except the last, drained after the lock
is released so that a slow drain does not hold the next rotation back. Empty slots (a
first start, `scale` up) are filled in parallel. A failed start leaves the set and
the old instance untouched; a failed deploy puts the slots it already replaced back
on the old definition, one at a time, so a deploy is all or nothing.
One lock covers every change of the set, so rotations of a component never interleave.

While an instance serves, a guard task watches it (health.watch): an exit, or
`unhealthy_threshold` failed health checks, takes it out of the balancing set at once
(unless it is the only one left: an unhealthy instance still answers better than
none) and starts a replacement for its slot, with exponential backoff (tenacity) and
at most `max_restarts` per `restart_window` for the component, after which the slot
stays empty (`degraded` if other replicas serve, else `failed`) until a manual
restart or start.

Where an instance listens is its Endpoint. A `transport: unix` component's instances
listen on Unix sockets instead of ports: the same rotation, with a socket path chosen
round-robin from the component's pool (ports.choose_socket), a stale socket file at
that path removed before the spawn, and the file removed again once its instance has
stopped. They are recorded in the state file and adopted as TCP ones are.

The side effects (spawning, health checks, port and socket probes) come in as objects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from rotator import logs
from rotator.canary import Figures, Verdict, canary_count, compare, describe, judge
from rotator.config import CanarySpec, ComponentSpec, Endpoint, apply_definition, definition_of
from rotator.events import Event, EventBus, Kind, Reason
from rotator.health import Clock, NotHealthy, SystemClock, watch
from rotator.instance import Instance, SpawnError, StopResult, new_marker
from rotator.notify import Channel
from rotator.ports import (
    NoFreePort,
    NoFreeSocket,
    PortState,
    SocketProbe,
    SocketState,
    choose_port,
    choose_socket,
    describe_exhausted,
    port_holders,
    probe_socket,
)
from rotator.printer import duration, error_text, os_error
from rotator.proxy.route import Route, Target
from rotator.state import ComponentRecord, InstanceRecord

Spawn = Callable[..., Awaitable[Instance]]
Probe = Callable[[str, int], PortState]

LOG_TAIL = 20
# Connections opened to a new instance before the switch: at most this many, each
# within WARM_TIMEOUT (a slow accept must not hold the switch back for long).
MAX_WARM = 32
WARM_TIMEOUT = 0.5
# (target, how many, timeout) -> how many were opened into the target's idle pool.
Warmer = Callable[[Target, int, float], Awaitable[int]]


class HealthGate(Protocol):
    """`definition` is what the instance was started from (an exec check runs with its
    cwd and env, a deployed one's included), `replica` the slot it fills."""

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
        """Seconds until healthy; with `ready` (READY=1 arrived), probed only once it has."""
        ...

    async def probe(
        self, endpoint: Endpoint, *, definition: ComponentSpec | None = None, replica: int = 0
    ) -> str | None: ...

    def forget(self, endpoint: Endpoint) -> None:
        """The instance is about to be stopped: close what the gate keeps open to it."""


class Notifications(Protocol):
    """What instances say over sd_notify (notify.NotifySocket): a Channel per instance."""

    path: Path  # their NOTIFY_SOCKET

    def watch(self, pid: int, marker: str) -> Channel: ...

    def forget(self, pid: int) -> None: ...


class ComponentState(enum.StrEnum):
    """Where a component is; its value is what status, events and metrics say."""

    STARTING = "starting"  # no instance yet (first start, or a crash's replacement)
    RUNNING = "running"  # every replica serves, healthy
    DEGRADED = "degraded"  # fewer healthy replicas serve than configured, but at least one
    ROTATING = "rotating"  # instances serve while replacements start
    STOPPED = "stopped"  # on purpose: its address answers 503
    FAILED = "failed"  # it could not be started, or crashed more than max_restarts allow


class RotationFailed(Exception):
    def __init__(
        self, reason: str, log_tail: list[str] | None = None, *, rolled_back: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail or []
        self.rolled_back = rolled_back  # verify failed and traffic went back to the old instance


@dataclass(eq=False)
class Serving:
    """An instance in the balancing set, filling its slot."""

    instance: Instance
    target: Target
    failures: int = 0  # health checks failed in a row


@dataclass(eq=False)
class Draining:
    instance: Instance
    target: Target
    task: asyncio.Task[None] | None = None  # the drain-and-stop, once begun


# How often a running canary is judged, and how often its figures are reported.
CANARY_TICK = 1.0
CANARY_REPORT = 3.0


@dataclass(eq=False)
class Canary:
    """A new definition on trial: its instances in the Route's canary set, taking
    `weight` % of the requests until `ends_at` (the component's clock) or a verdict."""

    spec: ComponentSpec
    weight: int
    rule: CanarySpec
    ends_at: float
    decided: asyncio.Future[Verdict]
    finished: asyncio.Future[None]  # the verdict carried out (promoted or rolled back)
    serving: dict[int, Serving] = field(default_factory=dict)


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
        log_dir: Path,
        spawn: Spawn,
        probe: Probe,
        socket_probe: SocketProbe = probe_socket,
        marker_scope: str = "-",
        warm: Warmer | None = None,
        clock: Clock | None = None,
        notify: Notifications | None = None,
    ) -> None:
        self.config_spec = spec
        self.spec = spec  # the definition instances start from: the config's, or a deployed one
        self.definition_source = "config"
        self.deployed_at: float | None = None
        self.previous: ComponentSpec | None = None
        self.scaled: int | None = None  # set by `rotator scale`; None = the config's count
        self.route = route
        self.bus = bus
        self.health = health
        self.log_dir = log_dir
        self._spawn = spawn
        self._probe = probe
        self._socket_probe = socket_probe
        self._marker_scope = marker_scope
        self._warm = warm
        self._notify = notify
        self._channels: dict[Instance, Channel] = {}  # what each live instance said (sd_notify)
        self.clock = clock or SystemClock()
        self.host = instance_host(spec.listen.host)
        self.state = ComponentState.STOPPED
        self.serving: dict[int, Serving] = {}  # by slot
        self.canary: Canary | None = None
        self.draining: list[Draining] = []
        self.restarts = 0
        self.last_port: int | None = None
        self.last_socket: str | None = None
        # Every instance started or adopted and not yet stopped (a crashed one included),
        # and the endpoints chosen for starts under way: not to be chosen again.
        self._live: set[Instance] = set()
        self._claimed: set[Endpoint] = set()
        self.last_error: str | None = None
        self.last_exit: int | None = None
        self.last_log_tail: list[str] = []
        self.last_stop: str | None = None
        self.last_rotation: dict[str, Any] | None = None
        self.stopped_on_purpose = False
        self.suspended = False  # see suspend()
        self._crashes: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()
        self._recoveries: dict[int, asyncio.Task[None]] = {}  # by slot
        self._guards: dict[Instance, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unrotatable: set[Path] = set()  # log files whose rotation failed

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def replicas(self) -> int:
        """How many instances should serve: a `scale`'s count, else the config's."""
        return self.scaled if self.scaled is not None else self.config_spec.replicas

    @property
    def active(self) -> Instance | None:
        """The instance of the lowest slot that serves (the one instance, with one replica)."""
        return self.serving[min(self.serving)].instance if self.serving else None

    @property
    def healthy(self) -> int:
        """Replicas in the balancing set that are alive and not past the failure threshold."""
        threshold = self.spec.health.unhealthy_threshold
        return sum(
            1
            for s in self.serving.values()
            if s.failures < threshold and s.instance.returncode is None
        )

    def emit(self, kind: Kind, message: str, **data: Any) -> None:
        self.bus.publish(Event(self.name, kind, message, data))

    # -- operations (each is one admin API call) --------------------------------
    async def rotate(self, reason: Reason = Reason.MANUAL, *, says_failure: bool = True) -> None:
        """Replace every replica (or start them) with zero downtime. Raises RotationFailed;
        without `says_failure` no `failed` event tells of it (the caller tells it its way)."""
        self._refuse_if_canary()
        self._reset_supervision()
        await self._rotate(self.spec, reason=reason, says_failure=says_failure)

    async def replace_replica(self, slot: int, reason: Reason) -> None:
        """Replace the instance of one slot with zero downtime (a limit it passed, say); the
        other replicas are not touched. Raises RotationFailed."""
        self._refuse_if_canary()
        if slot >= self.replicas:
            raise RotationFailed(f"{self.name} has no replica {slot}")
        await self._rotate(self.spec, slots=[slot], reason=reason)

    async def start(self) -> None:
        """Start the replicas that are missing; those that serve are left alone."""
        if len(self.serving) >= self.replicas:
            self.emit(Kind.START, f"already running ({self._pids()})")
            return
        self._refuse_if_canary()
        self._reset_supervision()
        await self._rotate(self.spec, slots=self._missing(), reason=Reason.START)

    async def deploy(self, spec: ComponentSpec) -> None:
        """Rotate to a new definition; it becomes the component's own only if every new
        instance is healthy (and passes `verify`). Raises RotationFailed, with every
        replica back on the old definition."""
        self._refuse_if_canary()
        self._reset_supervision()
        await self._rotate(spec, verify=spec.verify, undo=self.spec, reason=Reason.DEPLOY)
        self.previous, self.spec = self.spec, spec
        self.definition_source = "deployed"
        self.deployed_at = time.time()
        self.emit(Kind.DEPLOYED, f"now running the deployed definition: {' '.join(spec.command)}")

    async def rollback(self) -> None:
        """Return to the previous definition; during a canary, roll the canary back."""
        if (canary := self.canary) is not None:
            if not canary.decided.done():
                canary.decided.set_result(Verdict(False, f"rotator rollback {self.name}"))
            await asyncio.shield(canary.finished)
            return
        if self.previous is None:
            raise RotationFailed("nothing to roll back to: no earlier definition was deployed")
        self._reset_supervision()
        target = self.previous
        await self._rotate(target, undo=self.spec, reason=Reason.ROLLBACK)
        self.previous, self.spec = self.spec, target
        self.definition_source = "config" if target is self.config_spec else "deployed"
        self.deployed_at = None if target is self.config_spec else time.time()
        self.emit(
            Kind.ROLLED_BACK,
            f"back to the {self.definition_source} definition: {' '.join(target.command)}",
        )

    # -- a canary ------------------------------------------------------------------------
    async def deploy_canary(self, spec: ComponentSpec, weight: int, rule: CanarySpec) -> None:
        """Put `spec` on trial: start ceil(replicas x weight / 100) instances of it, gated,
        send them `weight` % of the requests, and judge them by `rule` against the stable ones
        (canary.judge) until the window ends or a verdict comes earlier (the rule, an exit,
        `promote`, `rollback`). Promoted: the stable replicas are replaced by it, one at a
        time, and it becomes the component's definition, as after a deploy. Rolled back:
        the canary leaves at once and RotationFailed says why; the stable replicas were
        never touched."""
        self._refuse_if_suspended()
        self._refuse_if_canary()
        count = canary_count(self.replicas, weight)
        async with self._lock:
            self._refuse_if_suspended()
            self._refuse_if_canary()
            if not self.serving:
                raise RotationFailed("nothing serves to compare a canary with: start it first")
            canary = await self._start_canary(spec, weight, rule, count)
        try:
            verdict = await self._judge(canary)
            self.emit(
                Kind.VERDICT,
                f"canary {'promoted' if verdict.promote else 'rolled back'}: {verdict.reason}",
                outcome="promote" if verdict.promote else "rollback",
                reason=verdict.reason,
            )
            if verdict.promote:
                await self._promote(canary)
            else:
                tail = [line for s in canary.serving.values() for line in s.instance.tail(LOG_TAIL)]
                # The command ends once the canary is gone, not while it drains.
                await asyncio.gather(*self._drop_canary(canary))
                raise RotationFailed(
                    f"canary rolled back: {verdict.reason}", tail[-LOG_TAIL:], rolled_back=True
                )
        finally:
            self._drop_canary(canary)  # whatever happened, no canary is left behind
            if not canary.finished.done():
                canary.finished.set_result(None)

    async def promote(self) -> None:
        """End the running canary with a promotion; returns once it is carried out."""
        canary = self.canary
        if canary is None:
            raise RotationFailed(f"no canary is running for {self.name}")
        if not canary.decided.done():
            canary.decided.set_result(Verdict(True, f"rotator promote {self.name}"))
        await asyncio.shield(canary.finished)
        if self.spec is not canary.spec:
            raise RotationFailed(f"the promotion failed: {self.last_error}")

    async def _start_canary(
        self, spec: ComponentSpec, weight: int, rule: CanarySpec, count: int
    ) -> Canary:
        """Under the lock: the canary's instances, started in parallel and gated; all of
        them or none (RotationFailed)."""
        started, failure = await _all_of(self._launch(spec, slot) for slot in range(count))
        if failure is not None:
            for inst in started:
                await self._stop(inst, spec.stop_signal, spec.stop_timeout)
            if not isinstance(failure, Exception):
                raise failure
            exc = failure if isinstance(failure, RotationFailed) else _failed_start(failure)
            raise RotationFailed(f"the canary did not start: {exc.reason}", exc.log_tail)
        loop = asyncio.get_running_loop()
        canary = Canary(
            spec,
            weight,
            rule,
            self.clock.now() + rule.duration,
            loop.create_future(),
            loop.create_future(),
        )
        self.canary = canary
        self.route.reset_figures()
        self.route.canary_weight = weight
        for inst in started:
            target = self._target(
                inst, label=f"{self.name}[{inst.pid} {inst.endpoint.short} canary]"
            )
            canary.serving[inst.replica] = Serving(inst, target)
            self.route.add(target, canary=True)
            self._ensure_guard(inst)
        pids = ", ".join(str(inst.pid) for inst in started)
        self.emit(
            Kind.CANARY,
            f"canary {weight}% to pid {pids} for {duration(rule.duration)}: {' '.join(spec.command)}",
            weight=weight,
            pids=[inst.pid for inst in started],
            seconds=rule.duration,
        )
        return canary

    def _figures(self) -> tuple[Figures, Figures]:
        """(canary, stable) since the canary started."""
        return _figures_of(self.route.canary_figures), _figures_of(self.route.stable_figures)

    async def _judge(self, canary: Canary) -> Verdict:
        reported = self.clock.now()
        while True:
            tick = asyncio.ensure_future(self.clock.sleep(CANARY_TICK))
            waits: set[asyncio.Future[Any]] = {canary.decided, tick}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                tick.cancel()
            if canary.decided.done():
                return canary.decided.result()
            now = self.clock.now()
            final = now >= canary.ends_at
            ahead, stable = self._figures()
            if final or now - reported >= CANARY_REPORT:
                reported = now
                self.emit(
                    Kind.CANARY_FIGURES,
                    describe(self.name, canary.weight, ahead, stable),
                    canary=_figures_json(ahead),
                    stable=_figures_json(stable),
                )
            if (verdict := judge(ahead, stable, canary.rule, final=final)) is not None:
                return verdict

    async def _promote(self, canary: Canary) -> None:
        """The canary's instances take the first stable slots, in place of the stable ones
        (drained and stopped); the other slots are replaced from the canary's definition,
        one at a time. A failure puts every slot back on the old definition."""
        retiring: list[Draining] = []
        old_spec = self.spec
        async with self._lock:
            self.route.canary_weight = 0
            moved: list[int] = []
            for slot, serving in sorted(canary.serving.items()):
                self.route.remove(serving.target)
                old = self.serving.get(slot)
                self.serving[slot] = serving
                if old is None:
                    self.route.add(serving.target)
                else:
                    self.route.replace(old.target, serving.target)
                    retiring.append(self._take_out(old, leave_route=False))
                moved.append(slot)
                self.emit(
                    Kind.SWITCHED,
                    f"canary pid {serving.instance.pid} now serves as replica {slot}",
                    pid=serving.instance.pid,
                    replica=slot,
                    **serving.instance.endpoint.at,
                )
            canary.serving.clear()
            self.canary = None
            self._set_state(ComponentState.ROTATING)
            try:
                for gone in retiring:  # their ports are needed for the slots left
                    await self._retire_soon(gone)
                retiring.clear()
                rest = [slot for slot in range(self.replicas) if slot not in moved]
                try:
                    await self._roll(canary.spec, rest, 0.0, old_spec, retiring)
                except RotationFailed as exc:
                    await self._undo(old_spec, moved, retiring, exc)
                    raise
            except RotationFailed as exc:
                self.last_error = exc.reason
                self.emit(Kind.FAILED, exc.reason, log_tail=exc.log_tail)
                raise
            finally:
                self._settle()
        await asyncio.gather(*(self._retire_soon(old) for old in retiring))
        self.previous, self.spec = old_spec, canary.spec
        self.definition_source = "deployed"
        self.deployed_at = time.time()
        self.emit(
            Kind.DEPLOYED, f"now running the deployed definition: {' '.join(canary.spec.command)}"
        )

    def _drop_canary(self, canary: Canary) -> list[asyncio.Task[None]]:
        """The canary's instances leave the balancing set at once, to be drained and
        stopped: the tasks that do it."""
        if self.canary is canary:
            self.canary = None
            self.route.canary_weight = 0
        tasks = []
        for serving in list(canary.serving.values()):
            self.route.remove(serving.target)
            self._unguard(serving.instance)
            serving.instance.stopping = True
            draining = Draining(serving.instance, serving.target)
            self.draining.append(draining)
            tasks.append(self._retire_soon(draining))
        canary.serving.clear()
        return tasks

    def _end_canary_now(self, reason: str) -> None:
        """Stopping or handing over: the running canary is rolled back, its instances go."""
        canary = self.canary
        if canary is None:
            return
        if not canary.decided.done():
            canary.decided.set_result(Verdict(False, reason))
        self._drop_canary(canary)

    def _canary_status(self) -> dict[str, Any] | None:
        canary = self.canary
        if canary is None:
            return None
        ahead, stable = self._figures()
        return {
            "weight": canary.weight,
            "instances": [
                {"pid": s.instance.pid, **s.instance.endpoint.address, "replica": slot}
                for slot, s in sorted(canary.serving.items())
            ],
            "ends_in_s": round(max(0.0, canary.ends_at - self.clock.now()), 1),
            "command": list(canary.spec.command),
            "canary": _figures_json(ahead),
            "stable": _figures_json(stable),
            "figures": compare(ahead, stable),
        }

    async def scale(self, replicas: int, *, from_config: bool = False) -> None:
        """Run `replicas` instances: start the missing ones (health-gated, in parallel), or
        take the highest slots out of the balancing set, drain and stop them; the others
        are not touched. The count holds (state file, adoption) until a reload changes
        the config's (`from_config`: this is that reload). Raises RotationFailed."""
        self._refuse_if_suspended()
        self._refuse_if_canary()
        if problem := self._pool_problem(replicas):
            raise RotationFailed(problem)
        retiring: list[Draining] = []
        async with self._lock:
            self._refuse_if_suspended()
            # What serves now: a reload has already given the component the file's count.
            was = len(self.serving)
            self.scaled = None if from_config else replicas
            for slot in [s for s in self._recoveries if s >= replicas]:
                self._recoveries.pop(slot).cancel()
            for slot in sorted(s for s in self.serving if s >= replicas):
                retiring.append(self._take_out(self.serving[slot]))
            if was != replicas:
                self.emit(Kind.SCALED, f"scaling {was} -> {replicas}", was=was, now=replicas)
            if self.stopped_on_purpose:
                pass  # it stays stopped; a start brings up the new count
            elif missing := self._missing():
                self._set_state(
                    ComponentState.ROTATING if self.serving else ComponentState.STARTING
                )
                try:
                    await self._fill(self.spec, missing)
                except RotationFailed as exc:
                    self.last_error = exc.reason
                    self.emit(Kind.FAILED, exc.reason, log_tail=exc.log_tail)
                    self._retry_missing()
                    raise
                finally:
                    self._settle(idle=ComponentState.FAILED)
            else:
                self._settle()
        await asyncio.gather(*(self._retire_soon(d) for d in retiring))

    def _pool_problem(self, replicas: int) -> str | None:
        pool = len(self.spec.sockets) if self.spec.unix else len(self.spec.ports)
        what = "sockets" if self.spec.unix else "ports"
        if replicas < 1:
            return f"replicas must be at least 1, not {replicas}"
        if replicas > 1 and pool < replicas + 1:
            return (
                f"{pool} {what} in the pool of {self.name} for {replicas} replicas; a rotation"
                f" needs replicas + 1 = {replicas + 1} (change `{what}` in the config)"
            )
        return None

    async def reconfigure(
        self, spec: ComponentSpec, *, rotate: bool, health: HealthGate | None = None
    ) -> None:
        """Take the definition a reloaded config gives. `rotate` (an instance field changed):
        a component that is not stopped on purpose rotates to it, gated by `health` (the new
        definition's check, if given), and the config's definition replaces a deployed
        one; if that rotation fails, nothing changes (RotationFailed), the check included.
        Otherwise the new settings apply in place, over a deployed definition if there is one.
        A change of `replicas` is the caller's to apply, with scale(from_config=True).
        During a canary, a change that rotates is refused (RotationFailed)."""
        if rotate:
            self._refuse_if_canary()
        if rotate and not self.stopped_on_purpose:
            self._reset_supervision()
            kept, self.health = self.health, health or self.health
            try:
                await self._rotate(spec, undo=self.spec, reason=Reason.RELOAD)
            except BaseException:
                self.health = kept
                raise
        elif rotate and health is not None:
            self.health = health
        if rotate:
            self.config_spec = self.spec = spec
            self.previous, self.definition_source, self.deployed_at = None, "config", None
        else:
            old_config, self.config_spec = self.config_spec, spec
            self.spec = self._rebase(self.spec, old_config)
            if self.previous is not None:
                self.previous = self._rebase(self.previous, old_config)
        self.route.limits = spec.proxy  # a rotation's reload may change the proxy's too

    def _rebase(self, spec: ComponentSpec, old_config: ComponentSpec) -> ComponentSpec:
        """`spec` (the config's definition or a deployed one) on top of the new config's."""
        if spec is old_config:
            return self.config_spec
        return apply_definition(self.config_spec, definition_of(spec))

    async def stop(self, *, force: bool = False, on_purpose: bool = True) -> None:
        """Take the component out of service; its public address answers 503 at once.
        On purpose (`rotator stop`), it stays stopped across daemon restarts."""
        self._refuse_if_suspended()
        self._cancel_recovery()
        self.stopped_on_purpose = on_purpose or self.stopped_on_purpose
        self.route.holding = False
        self._end_canary_now("the component was stopped")
        async with self._lock:
            for serving in list(self.serving.values()):
                self._take_out(serving)
            self._set_state(ComponentState.STOPPED)
        while self.draining:
            await asyncio.gather(*(self._retire_soon(d, force=force) for d in list(self.draining)))

    async def shutdown(self) -> None:
        """The daemon is going down: stop, and end every task of ours."""
        self.suspended = False  # going down overrides a takeover in progress
        await self.stop(on_purpose=False)
        for task in list(self._tasks):
            task.cancel()

    def _refuse_if_suspended(self) -> None:
        if self.suspended:
            raise RotationFailed("a new rotator daemon is taking over; try again in a moment")

    def _refuse_if_canary(self) -> None:
        if (canary := self.canary) is not None:
            left = max(0.0, canary.ends_at - self.clock.now())
            raise RotationFailed(
                f"a canary is running ({canary.weight}%, {duration(left)} left): end it first"
                f" with `rotator promote {self.name}` or `rotator rollback {self.name}`"
            )

    @property
    def busy(self) -> bool:
        """A rotation, start or crash recovery is under way."""
        return self._lock.locked() or any(not t.done() for t in self._recoveries.values())

    def suspend(self) -> None:
        """Another daemon is taking over: stop watching the serving instances (the new
        daemon adopts and watches them) and refuse every operation that would change what
        runs. Draining instances are still drained and stopped."""
        self.suspended = True
        self._cancel_recovery()
        self._end_canary_now("a new rotator daemon is taking over")
        for task in list(self._guards.values()):
            task.cancel()

    def resume(self) -> None:
        """The takeover did not happen: watch the serving instances again."""
        self.suspended = False
        for serving in self.serving.values():
            self._ensure_guard(serving.instance)

    async def finish_draining(self) -> None:
        """Wait for the drain-and-stop of every replaced instance already begun."""
        tasks = [d.task for d in self.draining if d.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def mark_failed(self, reason: str) -> None:
        """Not started at all (a dependency is not running)."""
        self.last_error = reason
        self._set_state(ComponentState.FAILED)
        self.emit(Kind.FAILED, reason)

    def restore(self, record: ComponentRecord) -> str | None:
        """Take what an earlier daemon recorded: stopped on purpose or not, a scaled count
        (unless the config's `replicas` changed since), and a deployed definition (over the
        config's). What was wrong with it, if anything."""
        self.stopped_on_purpose = record.stopped
        self.route.holding = not record.stopped
        if (
            record.replicas is not None
            and record.replicas_config in (None, self.config_spec.replicas)
            and self._pool_problem(record.replicas) is None
        ):
            self.scaled = record.replicas
        if record.definition is None:
            return None
        try:
            spec = apply_definition(self.config_spec, record.definition)
            previous = (
                apply_definition(self.config_spec, record.previous_definition)
                if record.previous_definition is not None
                else self.config_spec
            )
        except ValueError as exc:
            return (
                f"the deployed definition in the state file is unusable ({exc}); using the config's"
            )
        self.spec, self.previous = spec, previous
        self.definition_source = "deployed"
        self.deployed_at = record.deployed_at
        return None

    def adoptable(self, replica: int) -> str | None:
        """Why an earlier daemon's instance of slot `replica` cannot be adopted, or None."""
        if replica >= self.replicas:
            return f"replica {replica} is beyond the {self.replicas} configured"
        if replica in self.serving:
            return f"replica {replica} is already filled (pid {self.serving[replica].instance.pid})"
        return None

    def adopt(self, inst: Instance) -> None:
        """Put an instance an earlier daemon started in the balancing set, as it is (its
        slot must be adoptable)."""
        if inst.endpoint.path is None:
            self.last_port = inst.port
        else:
            self.last_socket = inst.endpoint.path
        self._live.add(inst)
        self._listen(inst)
        serving = Serving(inst, self._target(inst))
        self.serving[inst.replica] = serving
        self.route.add(serving.target)
        self._ensure_guard(inst)
        self._settle()
        self.emit(
            Kind.ADOPTED,
            f"adopted pid {inst.pid} on {inst.endpoint}{self._of_slot(inst)}",
            pid=inst.pid,
            replica=inst.replica,
            **inst.endpoint.at,
        )

    # -- the rotation ------------------------------------------------------------
    async def _rotate(
        self,
        spec: ComponentSpec,
        *,
        verify: float = 0.0,
        recovering: bool = False,
        slots: list[int] | None = None,
        undo: ComponentSpec | None = None,
        reason: Reason = Reason.MANUAL,
        says_failure: bool = True,
    ) -> None:
        """Fill or replace the instances of `slots` (default: every slot) from `spec`.
        Given `undo` (a deploy's old definition), a failure puts the slots already
        replaced back on it first."""
        if self._lock.locked():
            self.emit(Kind.WAITING, "waiting for the rotation in progress")
        began = self.clock.now()
        retiring: list[Draining] = []
        async with self._lock:
            self._refuse_if_suspended()
            self.stopped_on_purpose = False
            self.route.holding = True
            slots = list(range(self.replicas)) if slots is None else slots
            replacing = any(slot in self.serving for slot in slots)
            if not self.serving:
                self._set_state(ComponentState.STARTING)
            elif recovering:  # a replica is missing or sick: fewer serve than configured
                self._set_state(ComponentState.DEGRADED)
            else:
                self._set_state(ComponentState.ROTATING)
            try:
                await self._roll(spec, slots, verify, undo, retiring)
            except Exception as error:
                # Whatever went wrong (ENOSPC, a bug), the start failed: reported, retried
                # with backoff when recovering, never a component left `starting` for ever.
                exc = error if isinstance(error, RotationFailed) else _failed_start(error)
                self.last_error = exc.reason
                self._settle(idle=ComponentState.STARTING if recovering else ComponentState.FAILED)
                if says_failure:
                    self.emit(Kind.FAILED, exc.reason, log_tail=exc.log_tail)
                if not recovering:  # a recovery retries by itself
                    self._retry_missing()
                self._rotated(began, "rolled_back" if exc.rolled_back else "failed", reason)
                # What was taken out before the failure is still drained and stopped.
                for old in retiring:
                    self._retire_soon(old)
                if exc is error:
                    raise
                raise exc from error
            self.last_error = None
            if replacing or recovering:
                self.restarts += 1
            self._settle()
        await asyncio.gather(*(self._retire_soon(old) for old in retiring))
        self._rotated(began, "ok", reason)

    async def _roll(
        self,
        spec: ComponentSpec,
        slots: list[int],
        verify: float,
        undo: ComponentSpec | None,
        retiring: list[Draining],
    ) -> None:
        """Under the lock: fill the empty slots of `slots` in parallel, then replace the
        others one at a time. Old instances taken out go to `retiring`; all but the last
        are stopped before the next slot, so that their ports are free again."""
        filled = [slot for slot in slots if slot in self.serving]
        if empty := [slot for slot in slots if slot not in self.serving]:
            await self._fill(spec, empty, verify)
        replaced: list[int] = []
        for slot in filled:
            if retiring:
                await self._retire_soon(retiring.pop())
            try:
                new = await self._launch(spec, slot)
                # The slot's instance may have exited meanwhile (its slot is then empty).
                current = self.serving.get(slot)
                old = self._switch(new, await self._warmed_target(new, current))
                if verify > 0:
                    await self._verify(new, old, spec, verify)
                self._ensure_guard(new)  # after verify, which watches it meanwhile
            except RotationFailed as exc:
                if undo is not None and replaced:
                    await self._undo(undo, replaced, retiring, exc)
                raise
            if old is not None:
                retiring.append(old)
            else:
                # It exited during the roll: the new instance filled the empty slot, so
                # the replacement its exit asked for (waiting for this lock) is not needed.
                recovery = self._recoveries.get(slot)
                if recovery is not None and recovery is not asyncio.current_task():
                    recovery.cancel()
            replaced.append(slot)

    async def _undo(
        self,
        undo: ComponentSpec,
        replaced: list[int],
        retiring: list[Draining],
        failure: RotationFailed,
    ) -> None:
        """A deploy failed after `replaced` slots were done: those go back to `undo`, one at
        a time, with the usual gate. A failure of that too is added to the reason."""
        self.emit(
            Kind.ROLLBACK,
            f"putting replica(s) {', '.join(map(str, replaced))} back on the previous definition",
        )
        try:
            await self._roll(undo, replaced, 0.0, None, retiring)
        except RotationFailed as again:
            failure.reason += f"; putting the replaced replicas back failed too: {again.reason}"
            failure.args = (failure.reason,)
            return
        failure.reason += (
            f"; replica(s) {', '.join(map(str, replaced))} went back to the previous definition"
        )
        failure.args = (failure.reason,)

    async def _fill(self, spec: ComponentSpec, slots: list[int], verify: float = 0.0) -> None:
        """Start an instance for each empty slot, in parallel, each gated (and verified) on
        its own; those that pass join the balancing set. RotationFailed (the first
        failure) if any did not."""
        started, failure = await _all_of(
            self._launch_verified(spec, slot, verify) for slot in slots
        )
        for inst in started:
            self._ensure_guard(inst)
        if failure is not None:
            raise failure

    async def _launch_verified(self, spec: ComponentSpec, slot: int, verify: float) -> Instance:
        new = await self._launch(spec, slot)
        self._switch(new, self._serving_target(new))
        if verify > 0:
            await self._verify(new, None, spec, verify)
        return new

    def _prune_logs(self, new: Instance) -> None:
        """Log retention, as each instance starts; the files of live instances stay."""
        logs.prune(self.log_dir, {new.pid, *(inst.pid for inst in self._live)})

    async def rotate_logs(self) -> None:
        """Rotate the log file of each running instance (serving or draining) that reached
        `logs.max_size`: one stat each; the copying runs in a thread."""
        spec = self.spec
        if not spec.log_max_size:
            return
        serving = [*self.serving.values(), *(self.canary.serving.values() if self.canary else ())]
        for inst in [*(s.instance for s in serving), *(d.instance for d in self.draining)]:
            if inst.log_path is None:
                continue
            try:
                size = os.stat(inst.log_path).st_size
            except OSError:
                continue  # gone with a pruning, or never there
            if size < spec.log_max_size:
                continue
            try:
                await asyncio.to_thread(logs.rotate, inst.log_path, spec.log_keep)
            except OSError as exc:
                if inst.log_path not in self._unrotatable:  # said once, not every check
                    self._unrotatable.add(inst.log_path)
                    self.emit(
                        Kind.LOG,
                        f"cannot rotate the log of pid {inst.pid} ({inst.log_path.name}):"
                        f" {exc.strerror or exc}",
                        pid=inst.pid,
                    )
                continue
            self._unrotatable.discard(inst.log_path)
            self.emit(
                Kind.LOG,
                f"rotated the log of pid {inst.pid} at {size} bytes",
                pid=inst.pid,
                bytes=size,
            )

    def _rotated(self, began: float, outcome: str, reason: Reason) -> None:
        """A rotation ended: `ok`, `failed` (nothing changed) or `rolled_back` (verify failed)."""
        seconds = round(self.clock.now() - began, 3)
        if outcome == "ok":
            self.last_rotation = {"at": time.time(), "seconds": seconds}
        self.emit(
            Kind.ROTATED,
            f"rotation {outcome.replace('_', ' ')} after {duration(seconds)}",
            outcome=outcome,
            seconds=seconds,
            reason=reason,
        )

    async def _launch(self, spec: ComponentSpec, slot: int) -> Instance:
        if spec.unix:
            endpoint = Endpoint(self.host, path=self._choose_socket(spec))
        else:
            endpoint = Endpoint(self.host, self._choose_port(spec))
        self._claimed.add(endpoint)
        try:
            return await self._start(spec, slot, endpoint)
        finally:
            self._claimed.discard(endpoint)

    async def _start(self, spec: ComponentSpec, slot: int, endpoint: Endpoint) -> Instance:
        argv, env = spec.render(endpoint.port, self.host, endpoint.path, replica=slot)
        if self._notify is not None:  # over the service manager's, which the daemon keeps
            env["NOTIFY_SOCKET"] = str(self._notify.path)
            if spec.health.watchdog:  # as systemd does: sd_watchdog_enabled() reads it
                env["WATCHDOG_USEC"] = str(round(spec.health.watchdog * 1_000_000))
        marker = new_marker(self._marker_scope, self.name)
        try:
            inst = await self._spawn(
                self.name, endpoint, argv, env, spec.cwd, self.log_dir, marker, replica=slot
            )
        except SpawnError as exc:
            raise RotationFailed(str(exc)) from None
        except OSError as exc:
            raise RotationFailed(f"cannot start {argv[0]!r}: {os_error(exc)}") from None
        self._live.add(inst)
        channel = self._listen(inst)
        self._prune_logs(inst)
        of = self._of_slot(inst)
        self.emit(
            Kind.SPAWNED,
            f"started pid {inst.pid} on {endpoint}{of}",
            pid=inst.pid,
            replica=slot,
            **endpoint.at,
        )
        try:
            seconds = await self.health.wait_until_healthy(
                endpoint,
                inst.wait(),
                definition=spec,
                replica=slot,
                ready=channel.ready if channel and spec.health.ready == "notify" else None,
            )
        except NotHealthy as exc:
            await self._stop(inst, spec.stop_signal, spec.stop_timeout)
            raise RotationFailed(
                f"new instance pid {inst.pid} on {endpoint}{of} {exc}", inst.tail(LOG_TAIL)
            ) from None
        except asyncio.CancelledError:
            # Shutdown during a start: nobody else knows this instance yet.
            await asyncio.shield(self._stop(inst, spec.stop_signal, spec.stop_timeout))
            raise
        if endpoint.path is None:
            await self._own_port(inst, spec)
        self.emit(
            Kind.HEALTHY,
            f"pid {inst.pid} healthy after {duration(seconds)}",
            pid=inst.pid,
            ms=round(seconds * 1000),
        )
        return inst

    def _of_slot(self, inst: Instance) -> str:
        """' (replica 1 of 3)' when there are several; '' for the one instance."""
        return f" (replica {inst.replica} of {self.replicas})" if self.replicas > 1 else ""

    async def _own_port(self, inst: Instance, spec: ComponentSpec) -> None:
        """Whoever answered the health check, the switch needs the listener on the port to
        be the new instance's own, and no other one besides: else the instance is stopped
        and the start fails (RotationFailed), naming who holds the port."""
        try:
            problem = await inst.port_problem(wait=spec.health.start_timeout)
        except asyncio.CancelledError:
            await asyncio.shield(self._stop(inst, spec.stop_signal, spec.stop_timeout))
            raise
        if problem is not None:
            await self._stop(inst, spec.stop_signal, spec.stop_timeout)
            raise RotationFailed(f"{problem}: not switching to it", inst.tail(LOG_TAIL))

    def _choose_port(self, spec: ComponentSpec) -> int:
        in_use = {inst.port for inst in self._live} | {e.port for e in self._claimed}
        try:
            choice = choose_port(
                spec.ports, self.last_port, in_use, lambda p: self._probe(self.host, p)
            )
        except NoFreePort:
            own = {
                d.instance.port: f"draining instance (pid {d.instance.pid})" for d in self.draining
            }
            for serving in self.serving.values():
                own[serving.instance.port] = f"active instance (pid {serving.instance.pid})"
            holders = port_holders(spec.ports)
            raise RotationFailed(describe_exhausted(spec.ports, holders, own)) from None
        port = choice.port
        self.last_port = port
        if choice.state is PortState.TIME_WAIT:
            self.emit(
                Kind.PORT,
                f"every free port of the pool has TIME_WAIT left; using {port}, which SO_REUSEADDR accepts",
            )
        return port

    def _choose_socket(self, spec: ComponentSpec) -> str:
        """The next socket path of the pool, ready to bind: its directory made, a stale
        socket file at it removed. The paths of our instances that have not stopped
        yet (a crashed one included) are never chosen."""
        in_use = {inst.endpoint.path for inst in self._live} | {e.path for e in self._claimed}
        try:
            path, state = choose_socket(
                spec.sockets, self.last_socket, {p for p in in_use if p}, self._socket_probe
            )
        except NoFreeSocket as exc:
            raise RotationFailed(str(exc)) from None
        self.last_socket = path
        try:
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if state is SocketState.STALE:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                self.emit(Kind.SOCKET, f"removed the stale socket file {path}", socket=path)
        except OSError as exc:
            raise RotationFailed(f"cannot use socket {path}: {exc.strerror or exc}") from None
        return path

    def _listen(self, inst: Instance) -> Channel | None:
        """Hear what `inst` says over sd_notify (READY=1, STATUS=, WATCHDOG=1)."""
        if self._notify is None:
            return None
        channel = self._channels[inst] = self._notify.watch(inst.pid, inst.marker)
        return channel

    def _target(self, inst: Instance, label: str = "") -> Target:
        return Target(inst.endpoint, label=label)

    def _serving_target(self, inst: Instance) -> Target:
        return self._target(inst, label=f"{self.name}[{inst.pid} {inst.endpoint.short}]")

    def _check(self, inst: Instance, spec: ComponentSpec) -> Awaitable[str | None]:
        """One health probe of `inst` (started from `spec`)."""
        return self.health.probe(inst.endpoint, definition=spec, replica=inst.replica)

    async def _stop(
        self, inst: Instance, sig: signal.Signals, timeout: float, *, force: bool = False
    ) -> StopResult:
        """Stop `inst`'s tree; then its socket file, if it had one, goes too. Every stop
        (a retired instance, a failed start, a crashed one's leftovers) ends in one
        `stopped` event with its outcome: metrics.py counts them."""
        self.health.forget(inst.endpoint)
        result = await inst.stop(sig, timeout, force=force)
        self._live.discard(inst)
        if self._notify is not None and self._channels.pop(inst, None) is not None:
            self._notify.forget(inst.pid)
        path = inst.endpoint.path
        if path is not None and all(other.endpoint.path != path for other in self._live):
            with contextlib.suppress(OSError):
                os.unlink(path)
        if result.survivors:
            message = f"pid {inst.pid}: processes {list(result.survivors)} survived SIGKILL"
        else:
            message = f"stopped pid {inst.pid} ({result.outcome}, {duration(result.seconds)})"
        self.emit(Kind.STOPPED, message, pid=inst.pid, outcome=result.outcome)
        return result

    async def _warmed_target(self, inst: Instance, old: Serving | None) -> Target:
        """The new instance's Target, with as many connections already open as the one it
        replaces had (at most MAX_WARM): the first requests after the switch then skip
        the connect, which a freshly started instance is slow to accept."""
        target = self._serving_target(inst)
        count = min(MAX_WARM, len(old.target.connections)) if old is not None else 0
        if self._warm is not None and count:
            opened = await self._warm(target, count, WARM_TIMEOUT)
            self.emit(
                Kind.WARMED,
                f"opened {opened} connection(s) to pid {inst.pid}",
                pid=inst.pid,
                connections=opened,
            )
        return target

    def _switch(self, new: Instance, target: Target) -> Draining | None:
        """`new` takes its slot in the balancing set; the instance it replaces, if any,
        leaves the set in the same step and is returned, draining. Guarding `new` is
        the caller's (after a verify window, which watches it meanwhile)."""
        old = self.serving.get(new.replica)
        self.serving[new.replica] = Serving(new, target)
        if old is None:
            self.route.add(target)
        else:
            self.route.replace(old.target, target)
        draining = self._take_out(old, leave_route=False) if old is not None else None
        was = f"{old.instance.endpoint.short} -> " if old is not None else ""
        self.emit(
            Kind.SWITCHED,
            f"switched {was}{new.endpoint.short} (pid {new.pid}){self._of_slot(new)}",
            pid=new.pid,
            replica=new.replica,
            **new.endpoint.at,
            in_flight=old.target.in_flight if old is not None else 0,
        )
        return draining

    async def _verify(
        self, new: Instance, old: Draining | None, spec: ComponentSpec, window: float
    ) -> None:
        """Watch the new instance for `window` seconds after the switch; on failure put the
        one it replaced (still running) back in its slot and stop the new one."""
        reason = await self._watch(new, spec, until=self.clock.now() + window)
        if reason is None:
            self.emit(
                Kind.VERIFIED, f"pid {new.pid} stayed healthy for {duration(window)}", pid=new.pid
            )
            return
        serving = self.serving.pop(new.replica)
        self._unguard(new)
        if old is not None:
            self.draining.remove(old)
            old.instance.stopping = False
            self.serving[new.replica] = Serving(old.instance, old.target)
            self.route.replace(serving.target, old.target)
            self._ensure_guard(old.instance)
        else:
            self.route.remove(serving.target)
        self.emit(
            Kind.ROLLBACK,
            f"pid {new.pid} failed verification ({reason}): traffic back to "
            + (f"pid {old.instance.pid}" if old else "nobody"),
            pid=new.pid,
        )
        new.stopping = True
        draining = Draining(new, serving.target)
        self.draining.append(draining)
        self._retire_soon(draining)
        raise RotationFailed(
            f"rolled back: new instance pid {new.pid} {reason} within verify {duration(window)}",
            new.tail(LOG_TAIL),
            rolled_back=True,
        )

    def _ensure_guard(self, inst: Instance) -> None:
        guard = self._guards.get(inst)
        if guard is None or guard.done():
            guard = self._spawn_task(self._guard(inst))
            self._guards[inst] = guard
            guard.add_done_callback(lambda _: self._guards.pop(inst, None))

    def _unguard(self, inst: Instance) -> None:
        """`inst` no longer serves: its guard stops probing it (a probe after forget()
        would leave a kept connection for the instance's stop to close on its side)."""
        guard = self._guards.pop(inst, None)
        if guard is not None and guard is not asyncio.current_task():
            guard.cancel()

    def _take_out(self, serving: Serving, *, leave_route: bool = True) -> Draining:
        """`serving` leaves its slot (and, unless the caller swapped it already, the
        balancing set) and is draining: no new request goes to it."""
        inst = serving.instance
        if self.serving.get(inst.replica) is serving:
            del self.serving[inst.replica]
        if leave_route:
            self.route.remove(serving.target)
        self._unguard(inst)
        inst.stopping = True
        draining = Draining(inst, serving.target)
        self.draining.append(draining)
        return draining

    def _retire_soon(self, old: Draining, *, force: bool = False) -> asyncio.Task[None]:
        """Drain and stop `old`, once: later callers wait for the same task."""
        if old.task is None:
            old.task = self._spawn_task(self._retire(old, force=force))
        return old.task

    async def _retire(self, old: Draining, *, force: bool = False) -> None:
        spec, inst, target = self.spec, old.instance, old.target
        target.retire()
        in_flight = target.in_flight
        began = self.clock.now()
        left = 0 if force else await target.drain(spec.drain_timeout)
        took = self.clock.now() - began
        if left or (force and target.in_flight):
            cut = left or target.in_flight
            target.close_all()
            self.emit(
                Kind.DRAINED,
                f"{'forced stop' if force else f'drain_timeout {duration(spec.drain_timeout)} passed'}: "
                f"cut {cut} request(s) of pid {inst.pid}",
                pid=inst.pid,
                cut=cut,
            )
        else:
            self.emit(
                Kind.DRAINED,
                f"drained {in_flight} request(s) from pid {inst.pid} in {duration(took)}",
                pid=inst.pid,
                requests=in_flight,
                seconds=round(took, 3),
            )
        result = await self._stop(inst, spec.stop_signal, spec.stop_timeout, force=force)
        self.last_stop = result.outcome
        with contextlib.suppress(ValueError):
            self.draining.remove(old)

    # -- supervision ------------------------------------------------------------------
    async def _guard(self, inst: Instance, check_health: bool = True) -> None:
        """Watch a serving instance: its exit, and (unless told not to) its health."""
        spec = self.canary.spec if self.canary and self._is_canary(inst) else self.spec
        threshold = spec.health.unhealthy_threshold

        def heard(problem: str | None, failures: int) -> None:
            serving = self._serving_of(inst)
            if serving is None:
                return
            serving.failures = failures
            if problem is not None:
                self.emit(
                    Kind.CHECK_FAILED,
                    f"pid {inst.pid} failed check {failures}/{threshold}: {problem}",
                    pid=inst.pid,
                    check=failures,  # one event per failed check; _crashed's has none
                )

        if check_health:
            reason = await self._watch(inst, spec, on_check=heard)
        else:
            reason = await self._exit_reason(inst)
        if (serving := self._serving_of(inst)) is None or inst.stopping or reason is None:
            return
        if inst.returncode is None:  # unhealthy (failed checks, a silent watchdog): say so
            serving.failures = max(serving.failures, threshold)
        self._crashed(inst, f"pid {inst.pid} {reason}", inst.returncode)

    def _serving_of(self, inst: Instance) -> Serving | None:
        """The Serving of `inst`, a stable or a canary one; None if it no longer serves."""
        for serving in (self.serving, self.canary.serving if self.canary else {}):
            found = serving.get(inst.replica)
            if found is not None and found.instance is inst:
                return found
        return None

    def _is_canary(self, inst: Instance) -> bool:
        canary = self.canary
        return canary is not None and any(s.instance is inst for s in canary.serving.values())

    async def _watch(
        self,
        inst: Instance,
        spec: ComponentSpec,
        *,
        until: float | None = None,
        on_check: Callable[[str | None, int], None] | None = None,
    ) -> str | None:
        """health.watch on `inst`, which also ends at its exit: why it failed ("exited
        with code 1", "failed 3 health checks in a row (...)"), or None if `until` came."""
        health = spec.health
        watching = asyncio.ensure_future(
            watch(
                lambda: self._check(inst, spec),
                interval=health.interval,
                threshold=health.unhealthy_threshold,
                clock=self.clock,
                on_check=on_check,
                until=until,
            )
        )
        exited = asyncio.ensure_future(self._exit_reason(inst))
        waits: set[asyncio.Future[Any]] = {watching, exited}
        channel = self._channels.get(inst)
        silent = None
        if health.watchdog and channel is not None:
            silent = asyncio.ensure_future(self._silence(channel, health.watchdog))
            waits.add(silent)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        for ended in (exited, silent):
            if ended is not None and ended.done() and not ended.cancelled():
                reason: str = ended.result()
                return reason
        problem = watching.result()
        if problem is None:
            return None
        return f"failed {health.unhealthy_threshold} health checks in a row ({problem})"

    async def _silence(self, channel: Channel, interval: float) -> str:
        """Returns once the instance has sent no WATCHDOG=1 for `interval` (counted from
        the start of the watch, as systemd counts from the service's start)."""
        while True:
            channel.alive.clear()
            kicked = asyncio.ensure_future(channel.alive.wait())
            timer = asyncio.ensure_future(self.clock.sleep(interval))
            try:
                await asyncio.wait({kicked, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                kicked.cancel()
                timer.cancel()
            if not channel.alive.is_set():
                return f"sent no WATCHDOG=1 for {duration(interval)} (health.watchdog)"

    async def _exit_reason(self, inst: Instance) -> str:
        return f"exited with code {await inst.wait()}"

    def _crashed(self, inst: Instance, reason: str, code: int | None) -> None:
        """A serving instance exited (`code`) or turned unhealthy (None): it leaves the
        balancing set at once, unless it is unhealthy and the only one left, and its slot
        gets a replacement."""
        serving = self._serving_of(inst)
        assert serving is not None
        if self.canary is not None and self._is_canary(inst):
            if not self.canary.decided.done():  # a broken canary ends it: no replacement
                self.canary.decided.set_result(Verdict(False, f"canary {reason}"))
            return
        self.last_error = reason
        self.last_exit = code
        self.last_log_tail = inst.tail(LOG_TAIL)
        others = len(self.serving) > 1
        if code is not None:
            # Gone: its requests go to the other replicas, or are held (hold_timeout)
            # until the replacement is ready. What it started may have outlived it (a
            # master's workers): the rest of its tree is stopped.
            del self.serving[inst.replica]
            self.route.remove(serving.target)
            inst.stopping = True
            self._spawn_task(self._stop_crashed(inst))
        elif others:
            self._retire_soon(self._take_out(serving))
        if not self._lock.locked():
            self._settle()
        self.emit(
            Kind.EXITED if code is not None else Kind.UNHEALTHY,
            reason,
            pid=inst.pid,
            code=code,
            replica=inst.replica,
            log_tail=self.last_log_tail,
        )
        slot = inst.replica
        recovery = self._recoveries.get(slot)
        if recovery is None or recovery.done():
            why = Reason.CRASH if code is not None else Reason.UNHEALTHY
            self._recoveries[slot] = self._spawn_task(self._recover(slot, why))

    async def _stop_crashed(self, inst: Instance) -> None:
        result = await self._stop(inst, self.spec.stop_signal, self.spec.stop_timeout)
        self.last_stop = result.outcome  # "gone", unless something of its tree was left

    async def _recover(self, slot: int, reason: Reason) -> None:
        spec = self.spec
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RotationFailed),
            wait=wait_exponential(
                multiplier=spec.restart.restart_backoff, max=spec.restart.restart_backoff_max
            ),
            stop=lambda _: self._budget_spent(),
            before_sleep=self._announce_backoff,
            sleep=self.clock.sleep,
            reraise=True,
        )
        # A crash soon after the last one waits first: the backoff spans crashes, not only
        # failed starts, so a crash loop slows down before it is given up.
        recent = self._recent_crashes()
        try:
            # Checked before the wait too: a spent budget gives up at once, not a backoff later.
            if self._budget_spent():
                raise RotationFailed("restart budget spent")
            if recent:
                delay = min(
                    spec.restart.restart_backoff * 2 ** (recent - 1),
                    spec.restart.restart_backoff_max,
                )
                self.emit(Kind.BACKOFF, f"next restart attempt in {duration(delay)}")
                await self.clock.sleep(delay)
            async for attempt in retrying:
                with attempt:
                    self._crashes.append(self.clock.now())
                    self.emit(
                        Kind.RESTARTING,
                        f"starting a replacement{' for replica ' + str(slot) if self.replicas > 1 else ''}"
                        f" (restart {self._recent_crashes()} of at most "
                        f"{spec.restart.max_restarts} in {duration(spec.restart.restart_window)})",
                    )
                    if slot < self.replicas:
                        await self._rotate(self.spec, recovering=True, slots=[slot], reason=reason)
        except RotationFailed:
            self._give_up(slot)

    def _retry_missing(self) -> None:
        """A start that left slots empty (a `scale` up, a `start`) while other replicas
        serve: each empty slot is retried as a crashed replica's is (backoff, within the
        restart budget), so that the count asked for is reached once the cause passes.
        With nothing serving, the component is `failed` instead, as a lone instance that
        cannot start is. A stop under way (it lets go of `holding` before it waits for the
        lock this start holds) is not undone by a retry."""
        if not self.serving or self.stopped_on_purpose or not self.route.holding:
            return
        for slot in self._missing():
            recovery = self._recoveries.get(slot)
            if recovery is None or recovery.done():
                self._recoveries[slot] = self._spawn_task(self._recover(slot, Reason.START))

    def _announce_backoff(self, retry_state: RetryCallState) -> None:
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        self.emit(Kind.BACKOFF, f"next restart attempt in {duration(delay)}")

    def _recent_crashes(self) -> int:
        horizon = self.clock.now() - self.spec.restart.restart_window
        while self._crashes and self._crashes[0] < horizon:
            self._crashes.popleft()
        return len(self._crashes)

    def _budget_spent(self) -> bool:
        return self._recent_crashes() >= self.spec.restart.max_restarts

    def _give_up(self, slot: int) -> None:
        window = duration(self.spec.restart.restart_window)
        serving = self.serving.get(slot)
        if serving is not None:
            # Unhealthy but alive: it keeps serving what it can, watched for its exit only.
            self.last_error = f"no healthy replacement could be started; last: {self.last_error}"
            self.emit(Kind.FAILED, self.last_error)
            inst = serving.instance
            self._unguard(inst)
            self._guards[inst] = self._spawn_task(self._guard(inst, check_health=False))
            return
        self.last_error = (
            f"gave up after {self._recent_crashes()} restarts in {window}; last: {self.last_error}"
        )
        if not self.serving:
            self.route.holding = False
            self._set_state(ComponentState.FAILED)
        else:
            self._settle()
        self.emit(Kind.FAILED, self.last_error, log_tail=self.last_log_tail)

    def _reset_supervision(self) -> None:
        self._crashes.clear()
        self._cancel_recovery()

    def _cancel_recovery(self) -> None:
        current = asyncio.current_task()
        for task in self._recoveries.values():
            if task is not current:
                task.cancel()
        self._recoveries.clear()

    def _spawn_task(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _missing(self) -> list[int]:
        return [slot for slot in range(self.replicas) if slot not in self.serving]

    def _settle(self, idle: ComponentState = ComponentState.STARTING) -> None:
        """The state that what serves now gives; `idle` when nothing does."""
        if not self.serving:
            state = ComponentState.STOPPED if self.stopped_on_purpose else idle
        elif self.healthy < self.replicas:
            state = ComponentState.DEGRADED
        else:
            state = ComponentState.RUNNING
        self._set_state(state)

    def _set_state(self, state: ComponentState) -> None:
        if state != self.state:
            was, self.state = self.state, state
            self.emit(Kind.STATE, f"{was} -> {state}", was=was, now=state)

    # -- reporting ----------------------------------------------------------------------
    def record(self) -> ComponentRecord:
        """What the state file keeps of this component."""
        return ComponentRecord(
            name=self.name,
            instances=tuple(_record(self.serving[slot].instance) for slot in sorted(self.serving)),
            draining=tuple(_record(d.instance) for d in self.draining),
            definition=definition_of(self.spec) if self.definition_source == "deployed" else None,
            definition_source=self.definition_source,
            deployed_at=self.deployed_at,
            previous_definition=definition_of(self.previous)
            if self.previous is not None and self.previous is not self.config_spec
            else None,
            stopped=self.stopped_on_purpose,
            replicas=self.scaled,
            replicas_config=None if self.scaled is None else self.config_spec.replicas,
            canary=tuple(_record(s.instance) for s in self.canary.serving.values())
            if self.canary
            else (),
        )

    def status(self) -> dict[str, Any]:
        threshold = self.spec.health.unhealthy_threshold
        instances = [
            {
                "pid": s.instance.pid,
                **s.instance.endpoint.address,
                "replica": slot,
                "healthy": s.instance.returncode is None and s.failures < threshold,
                "in_flight": s.target.in_flight,
                "requests": s.target.served,
                "since": s.instance.started,
                "adopted": s.instance.adopted,
                "rss_bytes": s.instance.rss_bytes,  # these two: see rotator.limits
                "restart_at": s.instance.restart_at,
                # Its last STATUS= over sd_notify, if it sent one.
                "status": channel.status if (channel := self._channels.get(s.instance)) else None,
            }
            for slot, s in sorted(self.serving.items())
        ]
        return {
            "name": self.name,
            "listen": str(self.spec.listen),
            "state": self.state,
            "replicas": self.replicas,
            "instances": instances,
            "active": {
                k: v
                for k, v in instances[0].items()
                if k
                not in ("in_flight", "requests", "replica", "rss_bytes", "restart_at", "status")
            }
            if instances
            else None,
            "draining": [
                {
                    "pid": d.instance.pid,
                    **d.instance.endpoint.address,
                    "in_flight": d.target.in_flight,
                }
                for d in self.draining
            ],
            "restarts": self.restarts,
            "requests": self.route.requests,
            "in_flight": self.in_flight,
            "definition": {
                "source": self.definition_source,
                "at": self.deployed_at,
                "command": list(self.spec.command),
                "can_roll_back": self.previous is not None,
            },
            "canary": self._canary_status(),
            "limits": {
                "max_memory": self.spec.limits.max_memory or None,
                "restart_every": self.spec.limits.restart_every or None,
            }
            if self.spec.limits.active
            else None,
            "last_rotation": self.last_rotation,
            "last_stop": self.last_stop,
            "last_error": self.last_error,
            "last_exit": self.last_exit,
            "log_tail": self.last_log_tail if self.state is ComponentState.FAILED else [],
        }

    @property
    def in_flight(self) -> int:
        """Requests at the component's instances now: those serving and those draining."""
        return sum(s.target.in_flight for s in self.serving.values()) + sum(
            d.target.in_flight for d in self.draining
        )

    def _pids(self) -> str:
        pids = [str(self.serving[slot].instance.pid) for slot in sorted(self.serving)]
        return f"pid{'s' if len(pids) > 1 else ''} {', '.join(pids)}"


async def _all_of(
    launches: Iterable[Awaitable[Instance]],
) -> tuple[list[Instance], BaseException | None]:
    """Run the starts in parallel: the instances started, and what failed, if anything (a
    cancellation before any error: the daemon is going down)."""
    results = await asyncio.gather(*launches, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    failures.sort(key=lambda f: isinstance(f, Exception))
    return [r for r in results if not isinstance(r, BaseException)], next(iter(failures), None)


def _figures_of(side: Any) -> Figures:
    return Figures(side.requests, side.errors, side.p95())


def _figures_json(figures: Figures) -> dict[str, Any]:
    p95 = figures.p95
    return {
        "requests": figures.requests,
        "errors": figures.errors,
        "p95_ms": None if p95 is None else round(p95 * 1000, 1),
    }


def _failed_start(exc: Exception) -> RotationFailed:
    return RotationFailed(f"the start failed: {error_text(exc)}")


def _record(inst: Instance) -> InstanceRecord:
    return InstanceRecord(
        pid=inst.pid,
        create_time=inst.create_time,
        port=inst.endpoint.port or None,
        socket=inst.endpoint.path,
        marker=inst.marker,
        started=inst.started,
        replica=inst.replica,
    )
