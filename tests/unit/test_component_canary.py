"""A canary, driven with the fakes of test_component.py and the Route's real figures
(recorded by hand, as the proxy records each answer): started beside the stable
instances, judged each second, promoted or rolled back. No processes, no sockets."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from rotator import printer
from rotator.component import Component, ComponentState, RotationFailed
from rotator.config import CanarySpec, ComponentSpec
from rotator.health import NotHealthy
from tests.unit.test_component import SPEC, World, run, settle

NEW = dataclasses.replace(SPEC, command=("new-app", "--port", "{port}"))
RULE = CanarySpec(duration=10.0, min_requests=20, max_error_rate=0.01, max_latency_ratio=1.5)


def traffic(w: World, *, canary: int, stable: int, errors: int = 0, ms: float = 10.0) -> None:
    """Answers as the proxy records them: `errors` of the canary's are 500s."""
    for n in range(canary):
        w.route.canary_figures.record(500 if n < errors else 200, ms / 1000)
    for _ in range(stable):
        w.route.stable_figures.record(200, 0.010)


async def started(w: World, spec: ComponentSpec = SPEC) -> Component:
    c = w.component(spec)
    await c.rotate()
    return c


def pids(c: Component) -> list[int]:
    return [c.serving[slot].instance.pid for slot in sorted(c.serving)]


def test_a_good_canary_is_promoted_at_the_end_of_its_window() -> None:
    async def scenario() -> None:
        w = World()
        c = await started(w)
        (stable,) = pids(c)
        trial = asyncio.ensure_future(c.deploy_canary(NEW, 10, RULE))
        await settle()
        assert c.canary is not None and w.route.canary_weight == 10
        (canary_pid,) = [s.instance.pid for s in c.canary.serving.values()]
        assert len(w.route.canary_targets) == 1 and c.status()["canary"]["weight"] == 10
        assert c.record().canary[0].pid == canary_pid
        with pytest.raises(RotationFailed, match="a canary is running \\(10%"):
            await c.rotate()
        with pytest.raises(RotationFailed, match="rotator promote web"):
            await c.scale(2)
        traffic(w, canary=30, stable=300)
        await w.clock.advance(9.5)
        assert not trial.done()
        await w.clock.advance(1.0)
        await trial
        # The canary's instance took the slot; the stable one was drained and stopped.
        assert pids(c) == [canary_pid] and c.canary is None and w.route.canary_targets == ()
        assert c.spec is NEW and c.previous is SPEC and c.definition_source == "deployed"
        assert w.instances[0].pid == stable and w.instances[0].stopped_with is not None
        verdict = next(e for e in w.events if e.kind == "verdict")
        assert verdict.data["outcome"] == "promote"
        assert any(e.kind == "canary_figures" for e in w.events)

    run(scenario())


def test_a_canary_that_breaks_the_error_rule_is_rolled_back_at_once() -> None:
    async def scenario() -> None:
        w = World()
        c = await started(w)
        before = pids(c)
        trial = asyncio.ensure_future(c.deploy_canary(NEW, 20, RULE))
        await settle()
        traffic(w, canary=20, stable=80, errors=4)  # 20% errors at min_requests
        await w.clock.advance(1.5)  # the next tick, long before the window's end
        with pytest.raises(RotationFailed, match=r"canary rolled back: .*20\.0% > max_error_rate"):
            await trial
        await settle()
        assert pids(c) == before and c.spec is SPEC and c.canary is None
        assert w.instances[1].stopped_with is not None  # the canary's instance went
        assert w.route.canary_weight == 0 and w.route.canary_targets == ()
        assert c.state == ComponentState.RUNNING

    run(scenario())


def test_too_little_traffic_rolls_back_and_min_requests_0_promotes_on_health() -> None:
    async def scenario() -> None:
        w = World()
        c = await started(w)
        trial = asyncio.ensure_future(c.deploy_canary(NEW, 10, RULE))
        await settle()
        traffic(w, canary=5, stable=50)
        await w.clock.advance(11)
        with pytest.raises(RotationFailed, match="not enough traffic \\(5 of 20 requests\\)"):
            await trial
        trial = asyncio.ensure_future(
            c.deploy_canary(NEW, 10, dataclasses.replace(RULE, min_requests=0))
        )
        await w.clock.advance(11)
        await trial
        assert c.spec is NEW

    run(scenario())


def test_promote_and_rollback_by_hand_end_the_window_early() -> None:
    async def scenario() -> None:
        w = World()
        c = await started(w)
        before = pids(c)
        trial = asyncio.ensure_future(c.deploy_canary(NEW, 10, RULE))
        await settle()
        await c.rollback()  # during a canary: aborts it, and returns once it is done
        with pytest.raises(RotationFailed, match="rotator rollback web"):
            await trial
        assert pids(c) == before and c.previous is None
        with pytest.raises(RotationFailed, match="no canary is running"):
            await c.promote()
        trial = asyncio.ensure_future(c.deploy_canary(NEW, 10, RULE))
        await settle()
        await c.promote()
        await trial
        assert c.spec is NEW and pids(c) != before

    run(scenario())


def test_a_canary_instance_that_exits_is_rolled_back_at_once() -> None:
    async def scenario() -> None:
        w = World()
        c = await started(w)
        trial = asyncio.ensure_future(c.deploy_canary(NEW, 10, RULE))
        await settle()
        w.instances[1].exit.set_result(1)
        await settle()
        with pytest.raises(RotationFailed, match="canary rolled back: canary pid 1001 exited"):
            await trial
        assert len(w.instances) == 2  # no replacement was started for it

    run(scenario())


def test_a_canary_of_replicas_takes_its_share_and_promotes_slot_by_slot() -> None:
    async def scenario() -> None:
        w = World()
        three = dataclasses.replace(SPEC, replicas=3, ports=(9001, 9002, 9003, 9004, 9005))
        c = await started(w, three)
        new = dataclasses.replace(three, command=("new-app", "--port", "{port}"))
        trial = asyncio.ensure_future(c.deploy_canary(new, 50, RULE))
        await settle()
        assert c.canary is not None and len(c.canary.serving) == 2  # ceil(3 x 50%)
        canaries = [s.instance.pid for s in c.canary.serving.values()]
        traffic(w, canary=100, stable=100)
        await w.clock.advance(11)
        await trial
        assert pids(c)[:2] == canaries and len(c.serving) == 3
        assert [c.serving[s].instance.argv[0] for s in range(3)] == ["new-app"] * 3  # type: ignore[attr-defined]

    run(scenario())


def test_stopping_the_component_ends_its_canary() -> None:
    async def scenario() -> None:
        w = World()
        c = await started(w)
        trial = asyncio.ensure_future(c.deploy_canary(NEW, 10, RULE))
        await settle()
        await c.stop()
        with pytest.raises(RotationFailed, match="the component was stopped"):
            await trial
        assert all(i.stopped_with is not None for i in w.instances)

    run(scenario())


def test_the_status_table_shows_a_running_canary_in_one_line() -> None:
    async def scenario() -> None:
        w = World()
        c = await started(w)
        trial = asyncio.ensure_future(c.deploy_canary(NEW, 10, RULE))
        await settle()
        traffic(w, canary=1, stable=1905, errors=1, ms=14.0)
        await w.clock.advance(2.0)
        table = printer.status_table({"components": [c.status()]}, now=0.0)
        assert (
            "  web: canary 10% (pid 1001, 8s left): 1 request, 1 error (100.0%), p95 14 ms"
            " | stable 1,905 requests, 0 errors (0.0%), p95 10 ms"
        ) in table
        await c.promote()
        await trial

    run(scenario())


def test_a_promotion_that_fails_puts_every_replica_back_on_the_old_definition() -> None:
    async def scenario() -> None:
        w = World()
        two = dataclasses.replace(SPEC, replicas=2, ports=(9001, 9002, 9003, 9004))
        c = await started(w, two)
        new = dataclasses.replace(two, command=("new-app", "--port", "{port}"))
        trial = asyncio.ensure_future(c.deploy_canary(new, 50, RULE))
        await settle()
        (canary_pid,) = [s.instance.pid for s in c.canary.serving.values()]  # type: ignore[union-attr]
        # Slot 0 takes the canary; slot 1's new instance fails its gate.
        w.health_script = [NotHealthy("exited with code 1 before becoming healthy")]
        traffic(w, canary=50, stable=50)
        await w.clock.advance(11)
        with pytest.raises(RotationFailed, match="went back to the previous definition"):
            await trial
        await settle()
        argvs = [c.serving[s].instance.argv[0] for s in range(2)]  # type: ignore[attr-defined]
        assert argvs == ["app", "app"] and c.spec is two and c.previous is None
        assert canary_pid not in [c.serving[s].instance.pid for s in range(2)]
        assert len(w.route.targets) == 2 and c.canary is None

    run(scenario())
