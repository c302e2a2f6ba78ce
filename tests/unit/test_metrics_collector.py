"""The metrics collector and the lifecycle counts, read through the real Prometheus text
format, over a Component driven by the scripted fakes of test_component (no processes)."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest

from rotator.component import Component, RotationFailed
from rotator.config import HealthSpec
from rotator.events import Event
from rotator.metrics import Metrics
from rotator.proxy.route import Route
from tests.conftest import Samples, parse_samples
from tests.conftest import sample as value
from tests.unit.test_component import SPEC, World, run


@dataclass
class Source:
    components: dict[str, Component] = field(default_factory=dict)
    event_loop: str = "asyncio"


def scrape(metrics: Metrics) -> Samples:
    return parse_samples(metrics.exposition().decode())


def setup(w: World, spec: Any = SPEC) -> tuple[Component, Metrics]:
    c = w.component(spec)
    metrics = Metrics(Source({c.name: c}), w.bus)
    return c, metrics


def test_request_counts_become_status_classes_and_cumulative_buckets() -> None:
    async def scenario() -> None:
        w = World()
        _, metrics = setup(w)
        route: Route = w.route
        route.answered(200, 0.0004)
        route.answered(204, 0.001)  # on a bound: counted in that bucket (le)
        route.answered(404, 0.003)
        route.answered(503, 20.0)  # past the last bound: +Inf only
        s = scrape(metrics)
        count = {
            c: value(s, "rotator_requests_total", component="web", code=f"{c}xx") for c in "12345"
        }
        assert count == {"1": 0, "2": 2, "3": 0, "4": 1, "5": 1}
        bucket = "rotator_request_duration_seconds_bucket"
        assert value(s, bucket, component="web", le="0.001") == 2
        assert value(s, bucket, component="web", le="0.005") == 3
        assert value(s, bucket, component="web", le="10.0") == 3
        assert value(s, bucket, component="web", le="+Inf") == 4
        assert value(s, "rotator_request_duration_seconds_count", component="web") == 4
        assert value(s, "rotator_request_duration_seconds_sum", component="web") == pytest.approx(
            20.0044
        )
        assert value(s, "rotator_info", version="0.1.0", event_loop="asyncio") == 1

    run(scenario())


def test_state_and_active_instance_follow_the_component() -> None:
    async def scenario() -> None:
        w = World()
        c, metrics = setup(w)
        await c.rotate()
        s = scrape(metrics)
        assert value(s, "rotator_active_instance_port", component="web") == 9001
        assert value(s, "rotator_active_instance_pid", component="web") == 1000
        assert value(s, "rotator_component_state", component="web", state="running") == 1
        assert value(s, "rotator_component_state", component="web", state="stopped") == 0
        await c.stop()
        s = scrape(metrics)
        assert value(s, "rotator_active_instance_port", component="web") is None
        assert value(s, "rotator_active_instance_pid", component="web") is None
        assert value(s, "rotator_component_state", component="web", state="stopped") == 1
        assert value(s, "rotator_instance_stops_total", component="web", outcome="graceful") == 1

    run(scenario())


def test_each_failed_health_check_counts_once() -> None:
    async def scenario() -> None:
        w = World()
        spec = dataclasses.replace(SPEC, health=HealthSpec(interval=1.0, unhealthy_threshold=3))
        c, metrics = setup(w, spec)
        await c.rotate()
        # Two failures, a pass, then three in a row: the threshold, so it is replaced.
        w.probe_script = ["500", "500", None, "500", "500", "500"]
        await w.clock.advance(6.5)
        assert len(w.instances) == 2 and c.state == "running" and not c.draining
        s = scrape(metrics)
        assert value(s, "rotator_health_check_failures_total", component="web") == 5
        assert value(s, "rotator_instance_restarts_total", component="web") == 1
        assert value(s, "rotator_rotations_total", component="web", outcome="ok") == 2

    run(scenario())


def test_rotation_outcomes_and_durations() -> None:
    async def scenario() -> None:
        w = World()
        c, metrics = setup(w)
        await c.rotate()
        w.probe_script = ["500"] * 2
        verifying = dataclasses.replace(
            SPEC, verify=5.0, health=HealthSpec(interval=1.0, unhealthy_threshold=2)
        )
        deploy = asyncio.ensure_future(c.deploy(verifying))
        await w.clock.advance(2.5)
        with pytest.raises(RotationFailed, match="rolled back"):
            await deploy
        w.health_script = [RotationFailed("never healthy")]
        with pytest.raises(RotationFailed):
            await c.rotate()
        s = scrape(metrics)
        outcomes = {
            o: value(s, "rotator_rotations_total", component="web", outcome=o)
            for o in ("ok", "failed", "rolled_back")
        }
        assert outcomes == {"ok": 1, "failed": 1, "rolled_back": 1}
        assert value(s, "rotator_rotation_duration_seconds_count", component="web") == 3
        took = sum(e.data["seconds"] for e in w.events if e.kind == "rotated")
        assert value(s, "rotator_rotation_duration_seconds_sum", component="web") == pytest.approx(
            took
        )

    run(scenario())


def test_malformed_events_neither_count_nor_unsubscribe_the_counters() -> None:
    async def scenario() -> None:
        w = World()
        _, metrics = setup(w)
        w.bus.publish(Event("web", "rotated", "?", {"outcome": None, "seconds": "x"}))
        w.bus.publish(Event("web", "rotated", "?", {"outcome": "ok", "seconds": "x"}))
        w.bus.publish(Event("web", "stopped", "?", {}))
        w.bus.publish(Event("web", "unhealthy", "threshold reached", {"code": None}))
        s = scrape(metrics)
        assert value(s, "rotator_rotations_total", component="web", outcome="ok") == 1
        assert value(s, "rotator_instance_stops_total", component="web", outcome="graceful") == 0
        assert value(s, "rotator_health_check_failures_total", component="web") == 0
        assert metrics.lifecycle in w.bus._subscribers

    run(scenario())


def test_a_removed_component_has_no_series() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        source = Source({c.name: c})
        metrics = Metrics(source, w.bus)
        await c.rotate()
        source.components.clear()  # as a reload that removed it
        names = {name for name, _ in scrape(metrics)}
        assert not any(n.startswith("rotator_") and n != "rotator_info" for n in names)

    run(scenario())


def test_rotations_count_by_why_they_ran() -> None:
    async def scenario() -> None:
        w = World()
        c, metrics = setup(w)
        await c.start()  # a first start
        await c.rotate()  # rotator restart
        w.instances[-1].exit.set_result(1)  # a crash: its replacement
        await w.clock.advance(0.5)
        new = dataclasses.replace(SPEC, command=("other", "--port", "{port}"))
        await c.deploy(new)
        s = scrape(metrics)
        reasons = {
            r: value(s, "rotator_rotation_reasons_total", component="web", reason=r)
            for r in ("start", "manual", "crash", "deploy", "unhealthy")
        }
        assert reasons == {"start": 1, "manual": 1, "crash": 1, "deploy": 1, "unhealthy": 0}
        assert [e.data["reason"] for e in w.events if e.kind == "rotated"] == [
            "start", "manual", "crash", "deploy",
        ]  # fmt: skip

    run(scenario())
