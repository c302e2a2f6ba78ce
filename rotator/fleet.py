"""Fleet-wide plans, pure: the order of a rolling restart, what a reload changes, how
long stopping everything may take, and the one scheduler that runs an action over
components in dependency order.

The daemon and reload.py carry the plans out; nothing here touches a socket or a
process, so every decision is testable from two Config objects (and the scheduler
with actions that only record what they were asked).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rotator.config import ComponentSpec, Config

# Over the daemon's own shutdown budget: what `rotator down` and a service manager
# wait before they call the shutdown stuck.
STOP_MARGIN = 10.0

# What an instance is started from: a change to one of these needs a new instance.
# Everything else (proxy limits, timeouts, restart policy, depends_on, verify) is
# applied to the running component in place. Health is here because a new health
# check should be proven by a health-gated start, not trusted. `replicas` is not: a new
# count starts or stops replicas and leaves the others running (ReloadPlan.scaled).
INSTANCE_FIELDS = ("command", "cwd", "env", "ports", "transport", "sockets", "health")


class ReloadRejected(Exception):
    """The reloaded config cannot be applied; nothing was changed. One line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ReloadPlan:
    added: tuple[str, ...] = ()  # new names: bound and started
    removed: tuple[str, ...] = ()  # gone: drained, stopped, their address released
    rebound: tuple[str, ...] = ()  # listen address changed: the old one removed, the new added
    rotated: tuple[str, ...] = ()  # an instance field changed: rotated to the new definition
    updated: tuple[str, ...] = ()  # only proxy or supervision settings: applied in place
    unchanged: tuple[str, ...] = ()
    # `replicas` changed in the file (see replicas_changed): scaled to the new count. Each
    # is also under `rotated` or `updated`, which say what else is applied and how.
    scaled: tuple[str, ...] = ()
    # Changes a running daemon cannot apply (its own address, its state_dir), one line each.
    ignored: tuple[str, ...] = ()


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """What applying `new` over the running `old` does to each component, in `new`'s
    dependency order (removed ones in `old`'s reverse order)."""
    before = {spec.name: spec for spec in old.components}
    after = {spec.name: spec for spec in new.components}
    groups: dict[str, list[str]] = {
        "added": [],
        "rebound": [],
        "rotated": [],
        "updated": [],
        "unchanged": [],
    }
    order = new.start_order()
    for name in order:
        groups[_change(before.get(name), after[name])].append(name)
    removed = [name for name in reversed(old.start_order()) if name not in after]
    kept = set(groups["rotated"] + groups["updated"])  # added and rebound ones start afresh
    scaled = [n for n in order if n in kept and replicas_changed(before[n], after[n])]
    return ReloadPlan(
        removed=tuple(removed),
        ignored=tuple(_daemon_changes(old, new)),
        scaled=tuple(scaled),
        **{key: tuple(names) for key, names in groups.items()},
    )


def replicas_changed(old: ComponentSpec, new: ComponentSpec) -> bool:
    """Whether the file's `replicas` differs between two specs of a component. `auto`
    and the number it resolved to are different settings: a reload that writes out the
    same count still applies it (over a count `rotator scale` set meanwhile)."""
    return (old.replicas, old.replicas_auto) != (new.replicas, new.replicas_auto)


def _change(old: ComponentSpec | None, new: ComponentSpec) -> str:
    if old is None:
        return "added"
    if old == new:
        return "unchanged"
    if old.listen != new.listen:
        return "rebound"
    if any(getattr(old, f) != getattr(new, f) for f in INSTANCE_FIELDS):
        return "rotated"
    return "updated"


def _daemon_changes(old: Config, new: Config) -> list[str]:
    notes = []
    if old.admin != new.admin:
        notes.append(
            f"admin.listen: {old.admin.listen} -> {new.admin.listen} takes effect at the next "
            "`rotator up` (the admin API stays where it is)"
        )
    if old.state_dir != new.state_dir:
        notes.append(
            f"state_dir: {old.state_dir} -> {new.state_dir} takes effect at the next `rotator up`"
        )
    return notes


def keep_daemon_settings(running: Config, new: Config) -> Config:
    """`new` with the settings only a daemon restart can change taken from `running`."""
    return dataclasses.replace(new, admin=running.admin, state_dir=running.state_dir)


def rolling_order(config: Config, names: Iterable[str]) -> list[str]:
    """`names` in dependency order (each after what it depends on; ties in file order)."""
    wanted = set(names)
    return [name for name in config.start_order() if name in wanted]


def reload_summary(result: dict[str, Any]) -> str:
    parts = [f"{label} {', '.join(result[key])}" for key, label in RELOAD_PARTS if result.get(key)]
    parts += [f"{name} failed ({why})" for name, why in (result.get("failed") or {}).items()]
    return "; ".join(parts) or "no component changed"


RELOAD_PARTS = (
    ("added", "started"),
    ("removed", "removed"),
    ("rebound", "moved to a new address"),
    ("rotated", "rotated"),
    ("updated", "updated in place"),
    ("scaled", "scaled"),
    ("not_rotated", "not rotated"),
)


def stop_budget(config: Config) -> float:
    """The longest a graceful shutdown may take: the requests' drain (once, for every
    listener at once), then the instances' stops, each after its dependents'."""
    specs = {spec.name: spec for spec in config.components}
    chain: dict[str, float] = {}

    def until_stopped(name: str) -> float:
        if name not in chain:
            dependents = [s.name for s in specs.values() if name in s.depends_on]
            chain[name] = specs[name].stop_timeout + max(map(until_stopped, dependents), default=0)
        return chain[name]

    drain = max((spec.drain_timeout for spec in specs.values()), default=0.0)
    return drain + max(map(until_stopped, specs), default=0.0) + STOP_MARGIN


async def in_dependency_order(
    names: Sequence[str],
    after: Callable[[str], Iterable[str]],
    action: Callable[[str, bool], Awaitable[bool]],
    *,
    parallel: int = 0,
) -> dict[str, bool]:
    """Run `action(name, ok)` for each of `names` once every name it must follow
    (`after(name)`, counted only among `names`) is done, `ok` telling whether all of
    those succeeded; at most `parallel` actions at once (0: no limit). What each
    action returned. An action that raises counts as failed for those that follow it;
    once every action has ended, the first such exception is raised.
    Starting follows dependencies; stopping follows dependents."""
    loop = asyncio.get_running_loop()
    done = {name: loop.create_future() for name in names}
    slots = asyncio.Semaphore(parallel) if parallel > 0 else None

    async def one(name: str) -> None:
        result = False
        try:
            ok = all(await asyncio.gather(*(done[n] for n in after(name) if n in done)))
            if slots is None:
                result = await action(name, ok)
            else:
                async with slots:
                    result = await action(name, ok)
        finally:  # an action that raised counts as failed: what follows it must not wait
            done[name].set_result(bool(result))

    outcomes = await asyncio.gather(*(one(name) for name in names), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return {name: future.result() for name, future in done.items()}
