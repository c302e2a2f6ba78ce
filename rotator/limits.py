"""Limits that trigger a rotation: `max_memory` and `restart_every`.

Every `limits_interval`, for each component that sets a limit, Limits measures the
resident memory of each serving instance's whole process tree (Instance.rss, off the
event loop: it scans processes) and works out when `restart_every` is due for it. Then it
replaces at most one replica of the component with a zero-downtime rotation
(Component.replace_replica): the one furthest over max_memory, else the one whose age
deadline passed first. An instance's deadline is its start, plus restart_every, plus a
jitter of up to JITTER of the period that is random across instances and fixed for one
(seeded by its marker, which a daemon that adopts it keeps), so that a fleet started
together does not rotate together; systemd's RuntimeRandomizedExtraSec extends
RuntimeMaxSec the same way.

Nothing is triggered while the component is busy (a rotation or crash recovery under
way), stopped, failed, not yet started, running a canary or handed over: the next check
tries again. A limit rotation that fails leaves the old instance serving (the component
reports the failure); the next attempt waits a delay that doubles each time, from
limits_interval up to RETRY_MAX, as crash restarts back off.

The decisions are the pure functions below; Limits carries them out. It reads the
daemon's components, and each one's spec, afresh at every round: a reload's new limits
apply at the next check, and components it adds or removes are picked up or dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import psutil

from rotator.component import Component, ComponentState, RotationFailed
from rotator.config import LimitsSpec
from rotator.events import Kind, Reason
from rotator.health import Clock, SystemClock
from rotator.instance import Instance
from rotator.printer import duration, error_text

# An instance's age deadline is extended by up to this fraction of restart_every.
JITTER = 0.1
# The longest wait before a limit rotation that failed is tried again (seconds).
RETRY_MAX = 300.0
# How often the list of components is looked at again when none sets a limit: a reload
# may add one. Checking a component without limits costs nothing.
IDLE_CHECK = 1.0
MIB = 1024 * 1024

Measure = Callable[[Instance], int]


@dataclass(frozen=True)
class Measured:
    """One serving instance as the last check found it."""

    slot: int
    pid: int
    started: float  # time.time()
    rss: int | None  # bytes; None: not measured (no max_memory, or it could not be read)
    restart_at: float | None  # time.time(); None: no restart_every


@dataclass(frozen=True)
class Decision:
    """The replica to replace, why, and the event's line (without the component's name)."""

    slot: int
    pid: int
    reason: Reason
    message: str


def jitter(marker: str, period: float) -> float:
    """What an instance's age deadline is extended by: from 0 to JITTER * period, random
    across instances, the same for one instance at every check and in every daemon."""
    return random.Random(marker).random() * JITTER * period


def deadline(started: float, marker: str, period: float) -> float:
    """When restart_every replaces an instance started at `started` (time.time())."""
    return started + period + jitter(marker, period)


def decide(instances: Sequence[Measured], limits: LimitsSpec, now: float) -> Decision | None:
    """The one replica to replace now, if any: max_memory first (the largest over it),
    then age (the earliest deadline past `now`, a time.time())."""
    several = len(instances) > 1

    def who(i: Measured) -> str:
        return f"pid {i.pid}" + (f" (replica {i.slot})" if several else "")

    limit = limits.max_memory
    over = [i for i in instances if limit and i.rss is not None and i.rss > limit]
    if over:
        worst = max(over, key=lambda i: (i.rss or 0, -i.slot))
        used, most = sizes(worst.rss or 0, limit)
        return Decision(
            worst.slot, worst.pid, Reason.MEMORY, f"{who(worst)} uses {used} > {most}, rotating"
        )
    due = [
        i
        for i in instances
        if limits.restart_every and i.restart_at is not None and i.restart_at <= now
    ]
    if due:
        first = min(due, key=lambda i: (i.restart_at or 0.0, i.slot))
        return Decision(
            first.slot,
            first.pid,
            Reason.AGE,
            f"{who(first)} has run {duration(now - first.started)}"
            f" (restart_every {duration(limits.restart_every)}), rotating",
        )
    return None


def sizes(used: int, limit: int) -> tuple[str, str]:
    """Both in MiB, with as many decimals as it takes to tell them apart (at most 3):
    '530 MiB', '512 MiB'; '512.4 MiB', '512 MiB'."""
    for places in range(4):
        a, b = (_trimmed(f"{n / MIB:.{places}f}") for n in (used, limit))
        if a != b:
            break
    return f"{a} MiB", f"{b} MiB"


def _trimmed(number: str) -> str:
    """'512.0' -> '512', '512.10' -> '512.1'; '530' stays."""
    return number.rstrip("0").rstrip(".") if "." in number else number


def retry_delay(failures: int, interval: float) -> float:
    """The wait before the next limit rotation of a component after `failures` in a row."""
    return min(interval * 2 ** min(failures - 1, 30), max(RETRY_MAX, interval))


def blocked(comp: Component) -> bool:
    """Whether a limit must not trigger now (it tries again at the next check)."""
    return (
        comp.busy
        or comp.canary is not None
        or comp.suspended
        or comp.stopped_on_purpose
        or comp.state in (ComponentState.STOPPED, ComponentState.FAILED, ComponentState.STARTING)
    )


class Limits:
    """Checks the limits of `components()` (read afresh each round) and replaces the
    instances over one. The clock paces the checks; `wall` is the time of Instance.started;
    `measure` is Instance.rss (a test's fake reads a table)."""

    def __init__(
        self,
        components: Callable[[], Iterable[Component]],
        *,
        clock: Clock | None = None,
        wall: Callable[[], float] = time.time,
        measure: Measure = Instance.rss,
        out: Callable[[str], None] = lambda _: None,
    ) -> None:
        self._components = components
        self._out = out
        self._said: str | None = None  # the last unexpected error said, said once
        self.clock = clock or SystemClock()
        self._wall = wall
        self._measure = measure
        # By component name: the last check (clock time), failed limit rotations in a
        # row, and the limit rotation under way.
        self._checked: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._rotations: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Check for ever (the daemon cancels it at shutdown; a limit rotation under way
        then finishes, as one the admin API asked for does)."""
        while True:
            try:
                wait = await self.check()
            except Exception as exc:  # a bug must not end the checks for the daemon's life
                said = error_text(exc)
                if said != self._said:
                    self._said = said
                    self._out(
                        f"rotator: warning: checking the limits failed ({said}); trying again"
                    )
                wait = IDLE_CHECK
            await self.clock.sleep(wait)

    async def check(self) -> float:
        """Check each component whose limits_interval has passed; the seconds until the
        next one is due."""
        comps = list(self._components())
        for gone in self._checked.keys() - {c.name for c in comps}:
            self._forget(gone)
        due = self.clock.now() + IDLE_CHECK
        for comp in comps:
            limits = comp.spec.limits
            if not limits.active:
                self._clear(comp)
                continue
            last = self._checked.get(comp.name)
            if last is None or self.clock.now() >= last + limits.interval:
                self._checked[comp.name] = last = self.clock.now()
                await self._check(comp, limits)
            due = min(due, last + limits.interval)
        return max(0.0, due - self.clock.now())

    async def _check(self, comp: Component, limits: LimitsSpec) -> None:
        measured = [
            await self._measured(slot, s.instance, limits)
            for slot, s in sorted(comp.serving.items())
        ]
        decision = decide(measured, limits, self._wall())
        if decision is None or blocked(comp) or self._rotating(comp.name):
            return
        if self.clock.now() < self._retry_at.get(comp.name, 0.0):
            return
        serving = comp.serving.get(decision.slot)
        if serving is None or serving.instance.pid != decision.pid:
            return  # replaced while it was measured
        comp.emit(
            Kind.LIMIT,
            decision.message,
            reason=decision.reason,
            pid=decision.pid,
            replica=decision.slot,
            rss_bytes=serving.instance.rss_bytes,
            max_memory=limits.max_memory or None,
            restart_every=limits.restart_every or None,
        )
        task = asyncio.ensure_future(self._replace(comp, decision, limits.interval))
        self._rotations[comp.name] = task

    async def _measured(self, slot: int, inst: Instance, limits: LimitsSpec) -> Measured:
        """Measure `inst` for `limits`, and keep what was found on it (status reads it)."""
        rss = None
        if limits.max_memory:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(psutil.Error, OSError):
                rss = await loop.run_in_executor(None, self._measure, inst)
        inst.rss_bytes = rss
        inst.restart_at = (
            deadline(inst.started, inst.marker, limits.restart_every)
            if limits.restart_every
            else None
        )
        return Measured(slot, inst.pid, inst.started, inst.rss_bytes, inst.restart_at)

    async def _replace(self, comp: Component, decision: Decision, interval: float) -> None:
        try:
            await comp.replace_replica(decision.slot, decision.reason)
        except RotationFailed:  # reported by the component; the old instance serves on
            failures = self._failures[comp.name] = self._failures.get(comp.name, 0) + 1
            # From the check that decided, so that the retry falls on a check.
            checked = self._checked.get(comp.name, self.clock.now())
            self._retry_at[comp.name] = checked + retry_delay(failures, interval)
        else:
            self._failures.pop(comp.name, None)
            self._retry_at.pop(comp.name, None)

    def _rotating(self, name: str) -> bool:
        task = self._rotations.get(name)
        return task is not None and not task.done()

    def _clear(self, comp: Component) -> None:
        """No limit (any more): nothing measured is shown."""
        self._forget(comp.name)
        for serving in comp.serving.values():
            serving.instance.rss_bytes = serving.instance.restart_at = None

    def _forget(self, name: str) -> None:
        for table in (self._checked, self._failures, self._retry_at):
            table.pop(name, None)
