"""Issue 18's limits that trigger a rotation: the config keys, the pure decisions
(rotator.limits: which instance is over a limit, the jittered age deadline) and the
checking loop driven with the fake instances and clock of test_component (no
processes, no sleeping), and how status shows them."""

from __future__ import annotations

import asyncio
import dataclasses
import textwrap
from pathlib import Path

import pytest

from rotator import printer
from rotator.config import ConfigError, LimitsSpec
from rotator.configfile import parse
from rotator.events import Reason
from rotator.health import NotHealthy
from rotator.limits import (
    JITTER,
    RETRY_MAX,
    Limits,
    Measured,
    deadline,
    decide,
    jitter,
    retry_delay,
)
from tests.unit.test_component import SPEC, FakeInstance, World, run
from tests.unit.test_config import HERMES
from tests.unit.test_config_options import ZEUS

MIB = 1024 * 1024


# -- config ------------------------------------------------------------------------------


def test_limits_are_read_from_a_component_or_defaults(tmp_path: Path) -> None:
    text = (
        "defaults:\n  max_memory: 512MiB\n  restart_every: 24h\n"
        + HERMES
        + "    limits_interval: 2s\n    max_memory: 0\n"
        + ZEUS
        + "    restart_every: 1h30m\n"
    )
    hermes, zeus = parse(text, tmp_path / "rotator.yaml").components
    assert hermes.limits == LimitsSpec(max_memory=0, restart_every=86400.0, interval=2.0)
    assert zeus.limits == LimitsSpec(max_memory=512 * MIB, restart_every=5400.0, interval=5.0)
    assert not parse(HERMES, tmp_path / "rotator.yaml").components[0].limits.active


@pytest.mark.parametrize(
    ("line", "path", "message"),
    [
        ("max_memory: 512KiB", "max_memory", "must be 0 (off) or 1MiB or more"),
        ("max_memory: 512MB", "max_memory", "'512MB' is not a size (use 512B, 64KiB, 1MiB"),
        ("restart_every: 500ms", "restart_every", "must be 0 (off) or 1s or more"),
        ("restart_every: 1d", "restart_every", "'1d' is not a duration"),
        ("limits_interval: 0", "limits_interval", "must be 100ms or more"),
        ("max_memroy: 1MiB", "max_memroy", "unknown key (did you mean 'max_memory'?)"),
    ],
)
def test_limit_problems_name_the_line_and_field(
    line: str, path: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(HERMES + f"    {line}\n"), tmp_path / "rotator.yaml")
    [problem] = info.value.problems
    assert problem.line == 6 and problem.path == f"components.hermes.{path}"
    assert message in problem.message


# -- the pure decisions --------------------------------------------------------------------


def test_the_jitter_is_fixed_per_instance_and_spreads_a_fleet() -> None:
    period = 86400.0
    assert jitter("scope:web:abc", period) == jitter("scope:web:abc", period)
    spread = [jitter(f"scope:web:{n:012x}", period) for n in range(500)]
    assert all(0 <= j < JITTER * period for j in spread)
    # Uniform over the window: no two instances of a fleet rotate together by design.
    assert min(spread) < 0.01 * period and max(spread) > 0.09 * period
    assert len(set(spread)) == len(spread)
    assert deadline(1000.0, "m", 100.0) == 1000.0 + 100.0 + jitter("m", 100.0)


def measured(slot: int, rss: int | None = None, restart_at: float | None = None) -> Measured:
    return Measured(slot, 4242 + slot, started=0.0, rss=rss, restart_at=restart_at)


def test_the_largest_instance_over_max_memory_is_chosen() -> None:
    limits = LimitsSpec(max_memory=512 * MIB)
    assert decide([measured(0, 512 * MIB)], limits, 0.0) is None  # at the limit is not over
    one = decide([measured(0, 530 * MIB)], limits, 0.0)
    assert one is not None and (one.slot, one.reason) == (0, Reason.MEMORY)
    assert one.message == "pid 4242 uses 530 MiB > 512 MiB, rotating"
    several = [measured(0, 600 * MIB), measured(1, 700 * MIB), measured(2, None)]
    two = decide(several, limits, 0.0)
    assert two is not None and two.slot == 1
    assert two.message == "pid 4243 (replica 1) uses 700 MiB > 512 MiB, rotating"
    # Figures that would round to the same number get the decimals that tell them apart.
    close = decide([measured(0, 512 * MIB + MIB // 10)], limits, 0.0)
    assert close is not None and close.message == "pid 4242 uses 512.1 MiB > 512 MiB, rotating"


def test_the_earliest_deadline_past_is_chosen_and_memory_comes_first() -> None:
    limits = LimitsSpec(max_memory=512 * MIB, restart_every=3600.0)
    ages = [measured(0, MIB, restart_at=3700.0), measured(1, MIB, restart_at=3650.0)]
    assert decide(ages, limits, 3649.0) is None
    due = decide(ages, limits, 3800.0)
    assert due is not None and (due.slot, due.reason) == (1, Reason.AGE)
    assert due.message == "pid 4243 (replica 1) has run 1h03m (restart_every 1h), rotating"
    ages[0] = measured(0, 600 * MIB, restart_at=3700.0)
    first = decide(ages, limits, 3800.0)
    assert first is not None and (first.slot, first.reason) == (0, Reason.MEMORY)
    assert decide(ages, LimitsSpec(), 3800.0) is None  # no limit set: nothing is over


def test_retries_after_failures_back_off_to_a_bound() -> None:
    assert [retry_delay(n, 5.0) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert retry_delay(10, 5.0) == RETRY_MAX and retry_delay(10_000, 5.0) == RETRY_MAX
    assert retry_delay(3, 600.0) == 600.0  # never sooner than the checks themselves


# -- the loop, on fake instances -------------------------------------------------------------

LIMITED = dataclasses.replace(
    SPEC, limits=LimitsSpec(max_memory=100 * MIB, restart_every=0.0, interval=5.0)
)


class Fleet:
    """A World, its component and a Limits over it: rss by pid, the wall clock by hand."""

    def __init__(self, spec: object = LIMITED, replicas: int = 1) -> None:
        self.w = World()
        spawn = self.w.spawn

        async def spawned_now(*args: object, **kwargs: object) -> object:
            inst = await spawn(*args, **kwargs)  # type: ignore[arg-type]
            inst.started = self.wall
            return inst

        self.w.spawn = spawned_now  # type: ignore[method-assign]
        spec = dataclasses.replace(spec, replicas=replicas)  # type: ignore[type-var]
        self.comp = self.w.component(spec)  # type: ignore[arg-type]
        self.rss: dict[int, int] = {}
        self.wall = 0.0
        self.limits = Limits(
            lambda: [self.comp], clock=self.w.clock, wall=lambda: self.wall, measure=self.measure
        )

    def measure(self, inst: object) -> int:
        assert isinstance(inst, FakeInstance)
        return self.rss.get(inst.pid, MIB)

    def pids(self) -> list[int]:
        return [self.comp.serving[s].instance.pid for s in sorted(self.comp.serving)]

    def reasons(self) -> list[str]:
        return [e.data["reason"] for e in self.w.events if e.kind == "rotated"]

    def limit_events(self) -> list[str]:
        return [e.message for e in self.w.events if e.kind == "limit"]

    async def ticks(self, seconds: float) -> None:
        """Run the loop for `seconds` of the fake clock (the executor is real: let it answer)."""
        for _ in range(int(seconds * 10)):
            await self.w.clock.advance(0.1)
            await asyncio.sleep(0.002)


def test_an_instance_over_max_memory_is_replaced_once_and_the_figure_is_shown() -> None:
    async def scenario() -> None:
        f = Fleet()
        await f.comp.start()
        [old] = f.pids()
        loop = asyncio.ensure_future(f.limits.run())
        await f.ticks(1)
        assert f.pids() == [old] and f.comp.status()["instances"][0]["rss_bytes"] == MIB
        f.rss[old] = 150 * MIB
        await f.ticks(6)
        [new] = f.pids()
        assert new != old and f.reasons() == ["start", "memory"]
        assert f.limit_events() == [f"pid {old} uses 150 MiB > 100 MiB, rotating"]
        status = f.comp.status()
        assert status["limits"] == {"max_memory": 100 * MIB, "restart_every": None}
        await f.ticks(10)  # the new instance is under the limit: nothing more
        assert f.pids() == [new] and f.reasons() == ["start", "memory"]
        loop.cancel()

    run(scenario())


def test_one_replica_at_a_time_and_the_next_at_the_next_check() -> None:
    async def scenario() -> None:
        f = Fleet(replicas=2)  # SPEC's pool of 3 ports: replicas + 1
        await f.comp.start()
        first = f.pids()
        f.rss[first[0]], f.rss[first[1]] = 200 * MIB, 300 * MIB
        loop = asyncio.ensure_future(f.limits.run())
        await f.ticks(0.5)  # the first check: the largest goes first, alone
        after = f.pids()
        assert after[0] == first[0] and after[1] != first[1]
        await f.ticks(5)  # the next check: the other one
        assert f.pids()[0] != first[0] and f.pids()[1] == after[1]
        assert f.reasons() == ["start", "memory", "memory"]
        loop.cancel()

    run(scenario())


def test_nothing_triggers_while_busy_stopped_or_running_a_canary() -> None:
    async def scenario() -> None:
        f = Fleet()
        await f.comp.start()
        [old] = f.pids()
        f.rss[old] = 150 * MIB
        loop = asyncio.ensure_future(f.limits.run())
        # A rotation in progress (its new instance not yet healthy): no second one.
        f.w.gate = asyncio.Event()
        manual = asyncio.ensure_future(f.comp.rotate())
        await f.ticks(6)
        assert f.limit_events() == [] and f.comp.busy
        f.w.gate.set()
        await manual
        f.w.gate = None
        [second] = f.pids()
        f.rss[second] = 150 * MIB
        await f.comp.stop()
        await f.ticks(6)
        assert f.limit_events() == [] and f.reasons() == ["start", "manual"]
        await f.comp.start()
        [third] = f.pids()
        f.rss[third] = 150 * MIB
        f.comp.canary = object()  # type: ignore[assignment]  # only whether one runs matters
        await f.ticks(6)
        assert f.limit_events() == [] and f.pids() == [third]
        f.comp.canary = None
        await f.ticks(6)  # the next check after it ended rotates
        assert f.limit_events() == [f"pid {third} uses 150 MiB > 100 MiB, rotating"]
        loop.cancel()

    run(scenario())


def test_restart_every_rotates_at_its_jittered_deadline() -> None:
    async def scenario() -> None:
        spec = dataclasses.replace(SPEC, limits=LimitsSpec(restart_every=100.0, interval=1.0))
        f = Fleet(spec)
        await f.comp.start()
        [inst] = [s.instance for s in f.comp.serving.values()]
        inst.started = 1000.0
        at = deadline(1000.0, inst.marker, 100.0)
        loop = asyncio.ensure_future(f.limits.run())
        f.wall = at - 0.5
        await f.ticks(2)
        assert f.pids() == [inst.pid]
        assert f.comp.status()["instances"][0]["restart_at"] == at
        assert f.comp.status()["instances"][0]["rss_bytes"] is None  # no max_memory
        f.wall = at + 0.5
        await f.ticks(2)
        assert f.pids() != [inst.pid] and f.reasons() == ["start", "age"]
        assert f.limit_events() == [
            f"pid {inst.pid} has run {printer.duration(at + 0.5 - 1000.0)}"
            " (restart_every 1m40s), rotating"
        ]
        loop.cancel()

    run(scenario())


def test_a_failed_limit_rotation_keeps_the_old_instance_and_backs_off() -> None:
    async def scenario() -> None:
        f = Fleet()
        await f.comp.start()
        [old] = f.pids()
        f.rss[old] = 150 * MIB
        f.w.health_script = [NotHealthy("exited with code 1 before becoming healthy")] * 2
        loop = asyncio.ensure_future(f.limits.run())
        await f.ticks(0.5)
        assert f.pids() == [old] and len(f.limit_events()) == 1
        await f.ticks(5)  # 5s after one failure: tried again
        assert f.pids() == [old] and len(f.limit_events()) == 2
        await f.ticks(5)  # after two, it waits 10s
        assert len(f.limit_events()) == 2
        await f.ticks(5)
        assert len(f.limit_events()) == 3 and f.pids() != [old]
        assert f.reasons() == ["start", "memory", "memory", "memory"]
        loop.cancel()

    run(scenario())


def test_a_reload_that_removes_the_limit_clears_the_figures() -> None:
    async def scenario() -> None:
        f = Fleet()
        await f.comp.start()
        loop = asyncio.ensure_future(f.limits.run())
        await f.ticks(0.5)
        assert f.comp.status()["instances"][0]["rss_bytes"] == MIB
        await f.comp.reconfigure(SPEC, rotate=False)
        await f.ticks(1.5)
        status = f.comp.status()
        assert status["limits"] is None and status["instances"][0]["rss_bytes"] is None
        loop.cancel()

    run(scenario())


# -- status ---------------------------------------------------------------------------------


def test_the_status_table_shows_the_limits_and_how_close_each_instance_is() -> None:
    instance = {
        "pid": 4242,
        "port": 18001,
        "socket": None,
        "replica": 0,
        "healthy": True,
        "since": 0.0,
        "adopted": False,
        "rss_bytes": 300 * MIB,
        "restart_at": 86400.0,
    }
    status = {
        "components": [
            {
                "name": "hermes",
                "state": "running",
                "listen": "127.0.0.1:8001",
                "replicas": 1,
                "instances": [instance],
                "active": instance,
                "draining": [],
                "restarts": 0,
                "limits": {"max_memory": 512 * MIB, "restart_every": 86400.0},
            }
        ]
    }
    table = printer.status_table(status, now=86400.0 - 3 * 3600 - 600)
    assert table.splitlines()[-1] == (
        "  hermes: max_memory 512MiB (pid 4242: 300MiB); restart_every 24h"
        " (next: pid 4242 in 3h10m)"
    )


def test_an_unexpected_error_is_said_once_and_the_checks_go_on() -> None:
    async def scenario() -> None:
        f = Fleet()
        said: list[str] = []
        f.limits._out = said.append
        await f.comp.start()
        [old] = f.pids()
        broken = True
        f.rss[old] = 150 * MIB
        original = f.limits._measured

        async def measured(*args: object) -> object:
            if broken:
                raise RuntimeError("a bug")
            return await original(*args)  # type: ignore[arg-type]

        f.limits._measured = measured  # type: ignore[method-assign]
        loop = asyncio.ensure_future(f.limits.run())
        await f.ticks(12)
        assert said == [
            "rotator: warning: checking the limits failed (RuntimeError: a bug); trying again"
        ]
        broken = False
        await f.ticks(8)
        assert f.pids() != [old] and f.reasons() == ["start", "memory"]
        assert not loop.done()
        loop.cancel()

    run(scenario())
