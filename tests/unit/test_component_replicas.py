"""Several replicas of one component, driven with the fakes of test_component.py: filled
in parallel, replaced one at a time, a failed deploy undone, a crashed replica taken out
of the balancing set at once, scaled. No processes, no sockets, no sleeping."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from rotator.component import Component, ComponentState, RotationFailed
from rotator.config import HealthSpec
from rotator.health import NotHealthy
from rotator.state import ComponentRecord
from tests.unit.test_component import SPEC, World, run, settle

THREE = dataclasses.replace(SPEC, replicas=3, ports=(9001, 9002, 9003, 9004))


def serving_pids(c: Component) -> list[int]:
    return [c.serving[slot].instance.pid for slot in sorted(c.serving)]


def set_sizes(w: World) -> list[int]:
    """The balancing set's size at each event from now on."""
    sizes: list[int] = []
    w.bus.subscribe(lambda _: sizes.append(len(w.route.targets)))
    return sizes


def test_replicas_start_in_parallel_each_gated_and_all_join_the_set() -> None:
    async def scenario() -> None:
        w = World()
        w.gate = asyncio.Event()
        c = w.component(THREE)
        starting = asyncio.ensure_future(c.rotate())
        await settle()
        assert len(w.instances) == 3 and w.route.targets == ()  # all spawned, none gated yet
        w.gate.set()
        await starting
        assert c.state == ComponentState.RUNNING and c.healthy == 3
        assert sorted(t.port for t in w.route.targets) == [9001, 9002, 9003]
        assert [i.replica for i in w.instances] == [0, 1, 2]
        assert [i["replica"] for i in c.status()["instances"]] == [0, 1, 2]

    run(scenario())


def test_a_restart_replaces_one_replica_at_a_time_and_the_set_never_shrinks() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(THREE)
        await c.rotate()
        first = serving_pids(c)
        sizes = set_sizes(w)
        await c.rotate()
        assert min(sizes) == 3 and len(w.route.targets) == 3
        assert set(serving_pids(c)).isdisjoint(first)
        # Each old one was stopped before the next new one started: 4 ports are enough.
        spawned = [e.data["pid"] for e in w.events if e.kind == "spawned"][3:]
        stopped = [e.data["pid"] for e in w.events if e.kind == "stopped"]
        assert stopped == first and len(spawned) == 3
        order = [(e.kind, e.data.get("pid")) for e in w.events if e.kind in ("spawned", "stopped")]
        assert order[3:] == [
            ("spawned", spawned[0]), ("stopped", first[0]),
            ("spawned", spawned[1]), ("stopped", first[1]),
            ("spawned", spawned[2]), ("stopped", first[2]),
        ]  # fmt: skip

    run(scenario())


def test_a_failed_restart_stops_at_the_failed_replica_and_the_others_keep_theirs() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(THREE)
        await c.rotate()
        first = serving_pids(c)
        w.health_script = [None, NotHealthy("exited with code 1 before becoming healthy")]
        with pytest.raises(RotationFailed, match="replica 1 of 3"):
            await c.rotate()
        now = serving_pids(c)
        assert now[0] not in first and now[1:] == first[1:]
        assert c.state == ComponentState.RUNNING and len(w.route.targets) == 3

    run(scenario())


def test_a_failed_deploy_puts_the_replaced_replicas_back_on_the_old_definition() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(THREE)
        await c.rotate()
        first = serving_pids(c)
        new = dataclasses.replace(THREE, command=("new-app", "--port", "{port}"))
        # Replica 0 of the new definition passes, replica 1 fails: replica 0 goes back.
        w.health_script = [None, NotHealthy("not healthy within start_timeout 1s")]
        sizes = set_sizes(w)
        with pytest.raises(RotationFailed, match="replica\\(s\\) 0 went back to the previous"):
            await c.deploy(new)
        assert min(sizes) == 3
        argvs = [c.serving[slot].instance.argv[0] for slot in sorted(c.serving)]  # type: ignore[attr-defined]
        assert argvs == ["app", "app", "app"] and c.spec is THREE
        assert serving_pids(c)[1:] == first[1:] and serving_pids(c)[0] not in first
        assert "rollback" in w.kinds()

    run(scenario())


def test_a_deploy_whose_first_replica_fails_changes_nothing() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(THREE)
        await c.rotate()
        first = serving_pids(c)
        w.health_script = [NotHealthy("exited with code 1 before becoming healthy")]
        with pytest.raises(RotationFailed):
            await c.deploy(dataclasses.replace(THREE, command=("new-app", "--port", "{port}")))
        assert serving_pids(c) == first and c.state == ComponentState.RUNNING

    run(scenario())


def test_a_crashed_replica_leaves_the_set_at_once_and_its_slot_is_filled() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(THREE)
        await c.rotate()
        crashed = c.serving[1]
        states: list[str] = []
        w.bus.subscribe(lambda e: states.append(e.data["now"]) if e.kind == "state" else None)
        w.gate = asyncio.Event()  # the replacement's start waits
        crashed.instance.exit.set_result(137)  # type: ignore[attr-defined]
        await settle()
        assert crashed.target not in w.route.targets and len(w.route.targets) == 2
        assert c.state == ComponentState.DEGRADED and c.status()["replicas"] == 3
        w.gate.set()
        await settle()
        assert len(w.route.targets) == 3 and c.serving[1].instance is not crashed.instance
        assert c.serving[1].instance.replica == 1
        assert c.state == ComponentState.RUNNING and "degraded" in states

    run(scenario())


def test_an_unhealthy_replica_leaves_the_set_but_a_lone_one_keeps_serving() -> None:
    async def scenario() -> None:
        w = World()
        spec = dataclasses.replace(THREE, health=HealthSpec(interval=1.0, unhealthy_threshold=2))
        c = w.component(spec)
        await c.rotate()
        sick = c.serving[0]
        w.gate = asyncio.Event()
        # One probe per replica each second; replica 0's two fail.
        w.probe_script = ["500", None, None, "500", None, None]
        await w.clock.advance(2.5)
        assert sick.target not in w.route.targets and sick.target.retired
        assert c.state == ComponentState.DEGRADED
        w.gate.set()
        await settle()
        assert len(w.route.targets) == 3 and c.state == ComponentState.RUNNING

    run(scenario())


def test_scale_up_starts_only_the_new_replicas_and_down_stops_the_highest() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(dataclasses.replace(THREE, replicas=1))
        await c.rotate()
        (one,) = serving_pids(c)
        await c.scale(3)
        assert serving_pids(c)[0] == one and len(w.route.targets) == 3
        assert c.record().replicas == 3
        kept = serving_pids(c)[:2]
        await c.scale(2)
        assert serving_pids(c) == kept and len(w.route.targets) == 2
        assert w.instances[-1].stopped_with is not None
        with pytest.raises(RotationFailed, match="a rotation needs replicas \\+ 1 = 5"):
            await c.scale(4)
        assert serving_pids(c) == kept
        await c.scale(1, from_config=True)  # a reload: the config's count again
        assert c.scaled is None and serving_pids(c) == [one]

    run(scenario())


def test_a_replica_that_fails_to_start_at_scale_up_is_retried_until_it_serves() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(dataclasses.replace(THREE, replicas=1))
        await c.rotate()
        w.health_script = [NotHealthy("exited with code 3 before becoming healthy"), None]
        with pytest.raises(RotationFailed, match="exited with code 3"):
            await c.scale(3)
        # The count asked for stands: the empty slot is retried, as a crashed replica's is.
        assert len(c.serving) == 2 and c.state == ComponentState.DEGRADED
        await w.clock.advance(0.1)
        assert len(c.serving) == 3 and len(w.route.targets) == 3
        assert c.state == ComponentState.RUNNING and "restarting" in w.kinds()

    run(scenario())


def test_a_replica_that_never_starts_is_given_up_and_the_others_serve_on() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(dataclasses.replace(THREE, replicas=1))
        await c.rotate()
        w.health_script = [None] + [NotHealthy("exited with code 1 before becoming healthy")] * 20
        with pytest.raises(RotationFailed):
            await c.scale(3)
        await w.clock.advance(600)
        assert len(c.serving) == 2 and c.state == ComponentState.DEGRADED
        assert "gave up after" in (c.last_error or "") and not c.busy
        assert w.route.holding and len(w.route.targets) == 2

    run(scenario())


def test_a_first_start_where_no_replica_starts_fails_and_is_not_retried() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(THREE)
        w.health_script = [NotHealthy("exited with code 1 before becoming healthy")] * 3
        with pytest.raises(RotationFailed):
            await c.start()
        await w.clock.advance(600)
        assert c.state == ComponentState.FAILED and len(w.instances) == 3 and not c.busy

    run(scenario())


def test_a_scaled_count_is_restored_from_the_state_file() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(dataclasses.replace(THREE, replicas=1))
        assert c.restore(ComponentRecord("web", replicas=3)) is None
        assert c.replicas == 3
        await c.start()
        assert len(c.serving) == 3
        too_many = w.component(dataclasses.replace(THREE, replicas=1))
        too_many.restore(ComponentRecord("web", replicas=9))  # a pool of 4 cannot hold it
        assert too_many.replicas == 1
        # Scaled when the file said 2: the file now says 1, and wins, as a reload would.
        changed = w.component(dataclasses.replace(THREE, replicas=1))
        changed.restore(ComponentRecord("web", replicas=3, replicas_config=2))
        assert changed.replicas == 1
        same = w.component(dataclasses.replace(THREE, replicas=1))
        same.restore(ComponentRecord("web", replicas=3, replicas_config=1))
        assert same.replicas == 3 and same.record().replicas_config == 1

    run(scenario())


def test_start_fills_only_the_missing_replicas() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(THREE)
        await c.rotate()
        first = serving_pids(c)
        c._take_out(c.serving[2])  # as if it had not been adopted
        await c.start()
        assert serving_pids(c)[:2] == first[:2] and len(c.serving) == 3

    run(scenario())


def test_a_stop_during_a_failing_scale_up_is_not_undone_by_a_retry() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component(dataclasses.replace(THREE, replicas=1))
        await c.rotate()
        w.gate = asyncio.Event()
        w.health_script = [NotHealthy("exited with code 3 before becoming healthy"), None]
        scaling = asyncio.ensure_future(c.scale(3))
        await settle()
        stopping = asyncio.ensure_future(c.stop(on_purpose=False))  # the daemon going down
        await settle()
        w.gate.set()
        with pytest.raises(RotationFailed):
            await scaling
        await stopping
        spawned = len(w.instances)
        await w.clock.advance(600)
        assert len(w.instances) == spawned and not c.serving and not c.busy
        assert c.state == ComponentState.STOPPED

    run(scenario())
