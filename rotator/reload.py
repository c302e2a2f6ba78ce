"""Changing a running fleet: the rolling restart of many components, and the reload of
the config file (prepared, then applied).

What to change is decided by the pure plans of fleet.py; this module carries them out
on the daemon's components, reaching the daemon only through `Fleet` (as takeover.py
reaches it through `Incumbent`). Binding addresses, building components and starting
them in dependency order stay the daemon's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rotator.component import Component, ComponentState, RotationFailed
from rotator.config import ComponentSpec, Config, ConfigError
from rotator.configfile import load
from rotator.events import Kind
from rotator.fleet import (
    ReloadPlan,
    ReloadRejected,
    in_dependency_order,
    keep_daemon_settings,
    plan_reload,
    reload_summary,
    rolling_order,
)
from rotator.health import HealthCheck
from rotator.proxy.protocol import Listener


class Fleet(Protocol):
    """What fleet operations need of the daemon (daemon.Daemon)."""

    config: Config
    components: dict[str, Component]
    listeners: dict[str, Listener]
    out: Callable[[str], None]

    async def bind(self, spec: ComponentSpec) -> Listener:
        """The component's public address, bound (ReloadRejected when it cannot be)."""
        ...

    def add_component(self, spec: ComponentSpec, listener: Listener) -> None: ...
    def health_check(self, spec: ComponentSpec) -> HealthCheck: ...

    async def start_components(self, names: set[str]) -> None:
        """Start these (new) components, each after the ones it depends on."""
        ...

    def reloading_changed(self, reloading: bool) -> None:
        """A reload began (True) or ended, whatever its outcome (False)."""

    def reconfigured(self, config: Config) -> None:
        """The fleet now runs `config`: apply its daemon-wide settings, save the state."""
        ...


@dataclass(frozen=True)
class Reload:
    """A checked reload, ready to apply: the new config, the plan, the new listeners."""

    config: Config
    plan: ReloadPlan
    listeners: dict[str, Listener]


class FleetOps:
    """Rolling restarts and reloads of one daemon's fleet; one reload at a time."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.reloading = False

    # -- the rolling restart ---------------------------------------------------------
    async def restart_many(self, names: Sequence[str] | None, parallel: int = 1) -> dict[str, Any]:
        """Rotate `names` (None: every component not stopped on purpose) in dependency
        order, at most `parallel` at once, each after the ones it depends on; after the
        first failure nothing more is begun. A summary of what was and was not done."""
        components = self.fleet.components
        if names is None:
            skipped = [n for n, c in components.items() if c.stopped_on_purpose]
            names = [n for n in components if n not in skipped]
        else:
            skipped = []
        order = rolling_order(self.fleet.config, names)
        restarted: list[str] = []
        failed: dict[str, str] = {}
        log_tails: dict[str, list[str]] = {}

        def after(name: str) -> tuple[str, ...]:
            comp = components.get(name)
            return comp.spec.depends_on if comp is not None else ()

        async def restart(name: str, deps_ok: bool) -> bool:
            # A reload may have removed it meanwhile: then there is nothing to restart.
            comp = self.fleet.components.get(name)
            if comp is None or not deps_ok or failed:
                return False
            try:
                await comp.rotate()
            except RotationFailed as exc:
                failed[name] = exc.reason
                log_tails[name] = exc.log_tail
                return False
            restarted.append(name)
            return True

        await in_dependency_order(order, after, restart, parallel=max(1, parallel))
        return {
            "result": "failed" if failed else "ok",
            "restarted": restarted,
            "failed": failed,
            "not_restarted": [n for n in order if n not in restarted and n not in failed],
            "skipped": skipped,
            "log_tail": log_tails,  # the failed new instance's last log lines
        }

    # -- reload ------------------------------------------------------------------------
    async def prepare_reload(self) -> Reload:
        """Read and check the config file again and bind any new public address.
        ReloadRejected (with every problem) changes nothing."""
        if self.reloading:
            raise ReloadRejected(["a reload is already in progress"])
        if any(c.suspended for c in self.fleet.components.values()):
            raise ReloadRejected(["a new rotator daemon is taking over; reload it instead"])
        self.reloading = True
        self.fleet.reloading_changed(True)
        try:
            return await self._prepare()
        except BaseException:
            self.reloading = False
            self.fleet.reloading_changed(False)
            raise

    async def _prepare(self) -> Reload:
        running = self.fleet.config
        loop = asyncio.get_running_loop()
        try:
            new = await loop.run_in_executor(None, load, running.path)
        except ConfigError as exc:
            raise ReloadRejected([str(p) for p in exc.problems]) from None
        new = keep_daemon_settings(running, new)
        plan = plan_reload(running, new)
        bound: dict[str, Listener] = {}
        try:
            for name in plan.added + plan.rebound:
                bound[name] = await self.fleet.bind(new.component(name))
        except ReloadRejected:
            for listener in bound.values():
                await listener.shutdown(0)
            raise
        return Reload(new, plan, bound)

    async def apply_reload(self, reload: Reload) -> dict[str, Any]:
        """Carry out a prepared reload: in-place updates, new components started, changed
        ones rotated one at a time in dependency order (stopping at the first failure:
        the rest keep their running definition and a later reload tries again), those
        whose `replicas` changed scaled to the file's count (over a `rotator scale`),
        removed ones drained and stopped and their addresses released."""
        try:
            return await self._apply(reload)
        finally:
            self.reloading = False
            self.fleet.reloading_changed(False)

    async def _apply(self, reload: Reload) -> dict[str, Any]:
        fleet, new, plan = self.fleet, reload.config, reload.plan
        for note in plan.ignored:
            fleet.out(f"rotator: reload: {note}")
        for name in plan.updated:
            spec = new.component(name)
            await fleet.components[name].reconfigure(spec, rotate=False)
        # Moved ones: the old address serves on until the new one has started.
        moved = [self._detach(name) for name in plan.rebound]
        for name, listener in reload.listeners.items():
            fleet.add_component(new.component(name), listener)
        started = set(plan.added + plan.rebound)
        await fleet.start_components(started)
        failed = {
            n: fleet.components[n].last_error or "failed"
            for n in started
            if fleet.components[n].state is ComponentState.FAILED
        }
        rotated: list[str] = []
        for name in plan.rotated:
            if failed:
                break
            try:
                await self._rotate_to(fleet.components[name], new.component(name))
                rotated.append(name)
            except RotationFailed as exc:
                failed[name] = exc.reason
        scaled: list[str] = []
        for name in plan.scaled:
            if name in failed:
                continue
            try:
                await fleet.components[name].scale(new.component(name).replicas, from_config=True)
                scaled.append(name)
            except RotationFailed as exc:
                failed[name] = exc.reason
        gone = [self._detach(name) for name in plan.removed] + moved
        await asyncio.gather(*(_retire(comp, listener) for comp, listener in gone))
        # In the file's order; what failed to rotate keeps the definition it runs.
        fleet.components = {n: fleet.components[n] for n in new.names if n in fleet.components}
        fleet.listeners = {n: fleet.listeners[n] for n in fleet.components}
        fleet.reconfigured(
            dataclasses.replace(
                new, components=tuple(c.config_spec for c in fleet.components.values())
            )
        )
        return {
            "result": "failed" if failed else "ok",
            "added": list(plan.added),
            "removed": list(plan.removed),
            "rebound": list(plan.rebound),
            "rotated": rotated,
            "not_rotated": [n for n in plan.rotated if n not in rotated and n not in failed],
            "updated": list(plan.updated),
            "scaled": scaled,
            "unchanged": list(plan.unchanged),
            "failed": failed,
            "ignored": list(plan.ignored),
        }

    async def _rotate_to(self, comp: Component, spec: ComponentSpec) -> None:
        """Rotate `comp` to a reloaded definition, gated by the new health check when it
        changed (an exec check also runs in the component's cwd, with its env)."""
        health = None
        if spec.health != comp.config_spec.health or spec.health.exec:
            health = self.fleet.health_check(spec)
        await comp.reconfigure(spec, rotate=True, health=health)

    def _detach(self, name: str) -> tuple[Component, Listener]:
        """Take a component out of the fleet (its name is free at once); it serves on
        until retired."""
        return self.fleet.components.pop(name), self.fleet.listeners.pop(name)

    async def reload_and_report(self) -> None:
        """A reload nobody waits for (SIGHUP): its outcome goes to the daemon's output."""
        out = self.fleet.out
        try:
            result = await self.apply_reload(await self.prepare_reload())
        except ReloadRejected as exc:
            out("rotator: reload rejected, nothing changed:")
            for problem in exc.problems:
                out(f"    {problem}")
            return
        out(f"rotator: reload {result['result']}: {reload_summary(result)}")


async def _retire(comp: Component, listener: Listener) -> None:
    """Drain and stop a detached component, then close its public address."""
    await comp.shutdown()
    await listener.shutdown(comp.spec.drain_timeout)
    comp.emit(Kind.REMOVED, f"removed; {comp.spec.listen} released")
