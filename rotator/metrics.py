"""Prometheus metrics: what `GET /metrics` on the admin address answers.

Nothing here runs per request. The proxy counts the requests it answered on
each Route in plain numbers (route.py); the lifecycle counts (rotations,
failed health checks, instance stops) are kept by LifecycleCounters, a
subscriber of the daemon's EventBus; Collector reads both, and the state of
each component, only when Prometheus scrapes. prometheus_client does the text
format, in a registry of our own (never its global one) that also holds its
ProcessCollector (CPU, memory, file descriptors; it reads /proc, so on macOS
it yields nothing). The reference of every metric is docs/metrics.md.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from rotator import __version__
from rotator.component import Component, ComponentState
from rotator.events import Event, EventBus, Kind, Reason
from rotator.proxy.route import DURATION_BOUNDS

# Rotations take from a fraction of a second (a quick app) to minutes (a slow
# start, a long verify window).
ROTATION_BOUNDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROTATION_OUTCOMES = ("ok", "failed", "rolled_back")
STOP_OUTCOMES = ("graceful", "forced", "gone")
STATES = tuple(ComponentState)
VERDICTS = ("promote", "rollback")


class Source(Protocol):
    """What the collector reads of the daemon, always afresh: a reload may add or remove
    components at any time."""

    @property
    def components(self) -> Mapping[str, Component]: ...

    @property
    def event_loop(self) -> str: ...


@dataclass
class Lifecycle:
    """One component's counts of what happened to it, from its events."""

    rotations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROTATION_OUTCOMES, 0))
    rotation_buckets: list[int] = field(default_factory=lambda: [0] * (len(ROTATION_BOUNDS) + 1))
    rotation_seconds: float = 0.0
    health_check_failures: int = 0
    stops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STOP_OUTCOMES, 0))
    verdicts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    reasons: dict[str, int] = field(default_factory=dict)  # rotations by why they ran


class LifecycleCounters:
    """An EventBus subscriber that counts rotations, failed health checks and instance stops.

    It must never raise: the bus drops a subscriber that does, and the counts would
    silently stop. Counts of a component removed by a reload are kept (a few
    numbers) and continue if it comes back.
    """

    def __init__(self) -> None:
        self.components: dict[str, Lifecycle] = {}

    def __call__(self, event: Event) -> None:
        kind, data = event.kind, event.data
        if kind == Kind.ROTATED:
            counts = self._of(event.component)
            self._rotated(counts, data.get("outcome"), data.get("seconds"))
            if isinstance(reason := data.get("reason"), str):
                counts.reasons[reason] = counts.reasons.get(reason, 0) + 1
        elif kind == Kind.CHECK_FAILED:
            self._of(event.component).health_check_failures += 1
        elif kind == Kind.VERDICT and data.get("outcome") in VERDICTS:
            self._of(event.component).verdicts[data["outcome"]] += 1
        elif kind == Kind.STOPPED and isinstance(outcome := data.get("outcome"), str):
            stops = self._of(event.component).stops
            stops[outcome] = stops.get(outcome, 0) + 1

    def _of(self, component: str) -> Lifecycle:
        found = self.components.get(component)
        if found is None:
            found = self.components[component] = Lifecycle()
        return found

    @staticmethod
    def _rotated(counts: Lifecycle, outcome: object, seconds: object) -> None:
        if not isinstance(outcome, str):
            return
        counts.rotations[outcome] = counts.rotations.get(outcome, 0) + 1
        took = float(seconds) if isinstance(seconds, int | float) else 0.0
        counts.rotation_buckets[bisect_left(ROTATION_BOUNDS, took)] += 1
        counts.rotation_seconds += took


def cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (one more than bounds: the overflow) as Prometheus' cumulative
    `le` buckets, +Inf last."""
    buckets, total = [], 0
    for bound, count in zip([*map(_le, bounds), "+Inf"], counts, strict=True):
        total += count
        buckets.append((bound, float(total)))
    return buckets


def _le(bound: float) -> str:
    return repr(float(bound))


class Collector:
    """Reads the proxy's counters, the lifecycle counts and the components' state at scrape time."""

    def __init__(self, source: Source, lifecycle: LifecycleCounters) -> None:
        self.source = source
        self.lifecycle = lifecycle

    def collect(self) -> Iterator[Metric]:
        # A copy: the scrape must not see the dict change under it (it runs on the
        # loop, so it cannot today, but a reload's edit between two families would
        # make them disagree).
        components = list(self.source.components.values())
        yield from self._traffic(components)
        yield from self._instances(components)
        yield from self._lifecycle(components)
        info = GaugeMetricFamily(
            "rotator_info", "rotator's version and event loop", labels=["version", "event_loop"]
        )
        info.add_metric([__version__, self.source.event_loop], 1)
        yield info

    def _traffic(self, components: list[Component]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "rotator_requests",
            "Requests answered through the proxy, by status class of the answer the client got",
            labels=["component", "code"],
        )
        durations = HistogramMetricFamily(
            "rotator_request_duration_seconds",
            "From a request's head arriving to its answer's end (a websocket: to its 101)",
            labels=["component"],
        )
        in_flight = GaugeMetricFamily(
            "rotator_requests_in_flight",
            "Requests at the component's instances now (held requests not included)",
            labels=["component"],
        )
        clients = GaugeMetricFamily(
            "rotator_client_connections",
            "Client connections open on the component's public address",
            labels=["component"],
        )
        evicted = CounterMetricFamily(
            "rotator_client_connections_evicted",
            "Idle client connections closed to make room for a new one at max_clients",
            labels=["component"],
        )
        refused = CounterMetricFamily(
            "rotator_client_connections_refused",
            "New client connections answered 503 and closed at max_clients, none being idle",
            labels=["component"],
        )
        for comp in components:
            route = comp.route
            clients.add_metric([comp.name], route.clients)
            evicted.add_metric([comp.name], route.clients_evicted)
            refused.add_metric([comp.name], route.clients_refused)
            for cls, count in enumerate(route.codes):
                if 1 <= cls <= 5 or count:
                    requests.add_metric([comp.name, f"{cls}xx"], count)
            durations.add_metric(
                [comp.name], cumulative(DURATION_BOUNDS, route.durations), route.duration_sum
            )
            in_flight.add_metric([comp.name], comp.in_flight)
        yield from (requests, durations, in_flight, clients, evicted, refused)
        yield from self._canaries(components)

    def _canaries(self, components: list[Component]) -> Iterator[Metric]:
        """The running canaries' figures, by side: gauges over the canary's window (they
        start at 0 with each canary, so they are not counters)."""
        weight = GaugeMetricFamily(
            "rotator_canary_weight",
            "The percent of requests a running canary takes (absent: no canary)",
            labels=["component"],
        )
        requests = GaugeMetricFamily(
            "rotator_canary_requests",
            "Requests answered since the running canary started, by version",
            labels=["component", "version"],
        )
        errors = GaugeMetricFamily(
            "rotator_canary_errors",
            "5xx answers (connection errors and timeouts included) since the running canary"
            " started, by version",
            labels=["component", "version"],
        )
        for comp in components:
            if comp.canary is None:
                continue
            weight.add_metric([comp.name], comp.canary.weight)
            sides = (("stable", comp.route.stable_figures), ("canary", comp.route.canary_figures))
            for version, side in sides:
                requests.add_metric([comp.name, version], side.requests)
                errors.add_metric([comp.name, version], side.errors)
        yield from (weight, requests, errors)

    def _instances(self, components: list[Component]) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "rotator_component_state",
            "1 for the component's current state, 0 for the others",
            labels=["component", "state"],
        )
        port = GaugeMetricFamily(
            "rotator_active_instance_port",
            "The pool port of the active instance (absent: none, or on a Unix socket)",
            labels=["component"],
        )
        pid = GaugeMetricFamily(
            "rotator_active_instance_pid",
            "The pid of the active instance (absent: none)",
            labels=["component"],
        )
        restarts = CounterMetricFamily(
            "rotator_instance_restarts",
            "Active instances replaced by a new one (restart, deploy, crash or health recovery)",
            labels=["component"],
        )
        replicas = GaugeMetricFamily(
            "rotator_replicas",
            "Replicas configured (or set by rotator scale)",
            labels=["component"],
        )
        healthy = GaugeMetricFamily(
            "rotator_replicas_healthy",
            "Replicas in the balancing set that are alive and not past unhealthy_threshold",
            labels=["component"],
        )
        for comp in components:
            replicas.add_metric([comp.name], comp.replicas)
            healthy.add_metric([comp.name], comp.healthy)
            names = STATES if comp.state in STATES else (*STATES, comp.state)
            for name in names:
                state.add_metric([comp.name, name], 1 if name == comp.state else 0)
            active = comp.active
            if active is not None:
                pid.add_metric([comp.name], active.pid)
                if active.port:  # 0: on a Unix socket
                    port.add_metric([comp.name], active.port)
            restarts.add_metric([comp.name], comp.restarts)
        yield from (state, port, pid, restarts, replicas, healthy)
        yield self._memory(components)

    def _memory(self, components: list[Component]) -> Metric:
        """What rotator.limits last measured (components with max_memory only): by slot,
        not pid, so that a series outlives the rotations its figure causes."""
        rss = GaugeMetricFamily(
            "rotator_instance_rss_bytes",
            "Resident memory of a serving replica's whole process tree at the last max_memory"
            " check (absent: no max_memory)",
            labels=["component", "replica"],
        )
        for comp in components:
            for slot, serving in sorted(comp.serving.items()):
                if serving.instance.rss_bytes is not None:
                    rss.add_metric([comp.name, str(slot)], serving.instance.rss_bytes)
        return rss

    def _lifecycle(self, components: list[Component]) -> Iterator[Metric]:
        rotations = CounterMetricFamily(
            "rotator_rotations",
            "Rotations (restart, start, deploy, rollback, crash recovery) by how they ended",
            labels=["component", "outcome"],
        )
        rotation_seconds = HistogramMetricFamily(
            "rotator_rotation_duration_seconds",
            "How long rotations took, from the start to the old instance gone (or the failure)",
            labels=["component"],
        )
        health = CounterMetricFamily(
            "rotator_health_check_failures",
            "Failed health checks of active instances",
            labels=["component"],
        )
        stops = CounterMetricFamily(
            "rotator_instance_stops",
            "Instances stopped by rotator, by how they went",
            labels=["component", "outcome"],
        )
        reasons = CounterMetricFamily(
            "rotator_rotation_reasons",
            "Rotations (whatever their outcome) by why they ran",
            labels=["component", "reason"],
        )
        verdicts = CounterMetricFamily(
            "rotator_canary_verdicts",
            "Canaries ended, by outcome: promote or rollback",
            labels=["component", "outcome"],
        )
        for comp in components:
            counts = self.lifecycle.components.get(comp.name) or Lifecycle()
            for outcome, n in counts.rotations.items():
                rotations.add_metric([comp.name, outcome], n)
            rotation_seconds.add_metric(
                [comp.name],
                cumulative(ROTATION_BOUNDS, counts.rotation_buckets),
                counts.rotation_seconds,
            )
            health.add_metric([comp.name], counts.health_check_failures)
            for outcome, n in counts.stops.items():
                stops.add_metric([comp.name, outcome], n)
            for outcome, n in counts.verdicts.items():
                verdicts.add_metric([comp.name, outcome], n)
            for reason in Reason:
                reasons.add_metric([comp.name, reason], counts.reasons.get(reason, 0))
        yield from (rotations, rotation_seconds, health, stops, verdicts, reasons)


class Metrics:
    """The daemon's metrics: the lifecycle subscriber, the collector and their registry."""

    def __init__(self, source: Source, bus: EventBus) -> None:
        self.lifecycle = LifecycleCounters()
        bus.subscribe(self.lifecycle)
        self.registry = CollectorRegistry()
        self.registry.register(Collector(source, self.lifecycle))
        ProcessCollector(registry=self.registry)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric, as of now."""
        return generate_latest(self.registry)
