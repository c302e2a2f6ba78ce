"""The rotation state machine, driven with fake instances, health gates and port probes:
no processes, no sockets, no sleeping."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import socket
from collections.abc import Awaitable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from rotator.component import Component, RotationFailed
from rotator.config import Address, ComponentSpec, Endpoint, HealthSpec, RestartPolicy
from rotator.events import Event, EventBus
from rotator.health import NotHealthy
from rotator.instance import StopResult
from rotator.ports import NoFreeSocket, PortState, SocketState, choose_socket, probe_socket
from rotator.proxy.route import Limits, Route

SPEC = ComponentSpec(
    name="web",
    listen=Address("127.0.0.1", 8000),
    ports=(9001, 9002, 9003),
    command=("app", "--port", "{port}"),
    cwd=Path("/"),
    env=MappingProxyType({}),
    health=HealthSpec(),
    drain_timeout=5.0,
    stop_signal=signal.SIGTERM,
    stop_timeout=1.0,
)


class FakeInstance:
    def __init__(self, pid: int, endpoint: Endpoint, replica: int = 0) -> None:
        self.pid, self.endpoint, self.port = pid, endpoint, endpoint.port
        self.replica = replica
        self.started = 0.0
        self.adopted = False
        self.marker = f"m{pid}"
        self.create_time = 1.0
        self.stopping = False
        self.rss_bytes: int | None = None  # set by rotator.limits
        self.restart_at: float | None = None
        self.stopped_with: signal.Signals | None = None
        self.squatted: str | None = None  # what port_problem() answers
        self.argv: list[str] = []
        self.exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @property
    def returncode(self) -> int | None:
        return self.exit.result() if self.exit.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self.exit)

    async def stop(self, sig: signal.Signals, timeout: float, *, force: bool = False) -> StopResult:
        self.stopped_with = signal.SIGKILL if force else sig
        if not self.exit.done():
            self.exit.set_result(-sig)
        return StopResult("graceful", 0.01)

    async def port_problem(self, wait: float = 0.0) -> str | None:
        return self.squatted

    def tail(self, lines: int = 20) -> list[str]:
        return [f"log of {self.pid}"]


class ScriptedHealth:
    """The health gate as the component sees it, answering from the World's script."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def wait_until_healthy(
        self, endpoint: Endpoint, exited: Awaitable[int], **_: object
    ) -> float:
        return await self.world.wait_until_healthy(endpoint, exited)

    async def probe(self, endpoint: Endpoint, **_: object) -> str | None:
        return self.world.probe_script.pop(0) if self.world.probe_script else None

    def forget(self, endpoint: Endpoint) -> None:
        self.world.forgotten.append(endpoint.port)


class FakeClock:
    """Time that moves only when a test steps it."""

    def __init__(self) -> None:
        self.time = 0.0
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.time + seconds, fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Step `seconds` forward, waking each sleeper at its time, in order, and letting
        what it starts run before the next one wakes."""
        end = self.time + seconds
        while True:
            await settle()
            self.sleepers = [(t, f) for t, f in self.sleepers if not f.done()]
            due = [entry for entry in self.sleepers if entry[0] <= end]
            if not due:
                break
            wake, fut = min(due, key=lambda entry: entry[0])
            self.time = max(self.time, wake)
            fut.set_result(None)
        self.time = end


async def settle() -> None:
    """Let every ready task run until none is left ready (the fakes never block)."""
    for _ in range(50):
        await asyncio.sleep(0)


class World:
    """The side effects a Component sees, scripted."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.bus = EventBus()
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        self.route = Route("web", Limits(hold_timeout=1.0))
        self.instances: list[FakeInstance] = []
        self.health_script: list[BaseException | None] = []  # per spawn: None = healthy
        self.gate: asyncio.Event | None = None  # when set, health waits for it
        self.busy: set[int] = set()
        self.probe_script: list[str | None] = []  # answers of health probes while running
        self.forgotten: list[int] = []  # ports whose kept health connection was closed
        self.squatted: dict[int, str] = {}  # port -> who holds it instead of the instance

    async def spawn(
        self,
        name: str,
        endpoint: Endpoint,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        log: Path,
        marker: str,
        replica: int = 0,
    ) -> Any:
        port = endpoint.port
        assert argv[1:] == ["--port", str(port)] and env["PORT"] == str(port)
        assert env["ROTATOR_REPLICA"] == str(replica)
        inst = FakeInstance(1000 + len(self.instances), endpoint, replica)
        inst.argv = argv
        inst.squatted = self.squatted.get(port)
        self.instances.append(inst)
        return inst

    async def wait_until_healthy(self, endpoint: Endpoint, exited: Awaitable[int]) -> float:
        asyncio.ensure_future(
            exited
        ).cancel()  # a real gate watches for the exit; this one is scripted
        outcome = self.health_script.pop(0) if self.health_script else None
        if self.gate is not None:
            await self.gate.wait()
        if outcome is not None:
            raise outcome
        return 0.05

    def probe(self, host: str, port: int) -> PortState:
        return PortState.BUSY if port in self.busy else PortState.FREE

    def component(self, spec: ComponentSpec = SPEC) -> Component:
        return Component(
            spec,
            self.route,
            self.bus,
            health=ScriptedHealth(self),
            log_dir=Path("/dev/null"),
            spawn=self.spawn,
            probe=self.probe,
            clock=self.clock,
        )

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events if e.kind != "state"]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_first_rotation_starts_and_routes() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        assert c.state == "running" and c.restarts == 0
        assert w.route.target is not None and w.route.target.port == 9001
        assert w.kinds() == ["spawned", "healthy", "switched", "rotated"]
        assert w.events[-1].data["outcome"] == "ok"
        assert c.status()["active"] == {
            "pid": 1000,
            "port": 9001,
            "socket": None,
            "healthy": True,
            "since": 0.0,
            "adopted": False,
        }

    run(scenario())


def test_rotation_switches_then_drains_then_stops_the_old_instance() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        old_target = w.route.target
        assert old_target is not None
        await c.rotate()
        assert w.route.target is not None and w.route.target.port == 9002
        assert old_target.retired
        assert w.instances[0].stopped_with == signal.SIGTERM
        assert w.kinds()[4:] == ["spawned", "healthy", "switched", "drained", "stopped", "rotated"]
        assert c.restarts == 1 and c.draining == [] and c.last_stop == "graceful"
        assert w.forgotten == [9001]  # the kept health connection closed before the stop

    run(scenario())


def test_ports_go_round_robin_and_skip_busy_ones() -> None:
    async def scenario() -> None:
        w = World()
        w.busy = {9002}
        c = w.component()
        ports = []
        for _ in range(4):
            await c.rotate()
            assert c.active is not None
            ports.append(c.active.port)
        assert ports == [9001, 9003, 9001, 9003]

    run(scenario())


def test_failed_health_gate_leaves_old_instance_and_route_untouched() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        target = w.route.target
        w.health_script = [NotHealthy("exited with code 3 before becoming healthy")]
        with pytest.raises(RotationFailed) as failed:
            await c.rotate()
        assert "exited with code 3" in failed.value.reason
        assert failed.value.log_tail == ["log of 1001"]
        assert w.route.target is target and not target.retired
        assert c.state == "running" and c.active is w.instances[0] and c.restarts == 0
        assert w.instances[1].stopped_with == signal.SIGTERM  # the failed one is stopped
        assert w.instances[0].stopped_with is None

    run(scenario())


def test_a_port_held_by_another_process_fails_the_start_and_is_never_switched_to() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        target = w.route.target
        w.squatted = {9002: "port 9002 is held by pid 77 (nc), not by the instance pid 1001"}
        with pytest.raises(RotationFailed) as failed:
            await c.rotate()
        assert failed.value.reason == (
            "port 9002 is held by pid 77 (nc), not by the instance pid 1001: not switching to it"
        )
        assert w.route.target is target and not target.retired
        assert c.state == "running" and c.active is w.instances[0] and c.restarts == 0
        assert w.instances[1].stopped_with == signal.SIGTERM
        assert w.forgotten == [9002]  # the health connection (to the squatter) is closed
        assert "healthy" not in w.kinds()[4:]
        await c.rotate()  # the next port is the instance's own
        assert w.route.target is not None and w.route.target.port == 9003

    run(scenario())


def test_a_squatted_first_start_and_crash_recovery_fail_too() -> None:
    async def scenario() -> None:
        w = World()
        w.squatted = {9001: "port 9001 is held by a process of another user, not by ..."}
        c = w.component()
        with pytest.raises(RotationFailed, match="another user"):
            await c.start()
        assert c.state == "failed" and w.route.target is None
        await c.start()
        assert c.active is not None and c.active.port == 9002
        w.squatted = {9003: "port 9003 is held by pid 77 (nc), not by ..."}
        w.instances[-1].exit.set_result(1)  # a crash: the replacement skips the squatter
        await w.clock.advance(5.0)  # the attempt on 9003 failed; the next waits its backoff
        assert (
            c.active is not None
            and c.active.port == 9001
            and w.instances[-2].stopped_with == signal.SIGTERM
        )

    run(scenario())


def test_exhausted_pool_fails_without_spawning() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        w.busy = {9002, 9003}
        active = c.active.pid if c.active else None
        with pytest.raises(RotationFailed, match="no free port in pool 9001-9003") as info:
            await c.rotate()
        assert f"9001 by this component's active instance (pid {active})" in str(info.value)
        assert len(w.instances) == 1 and c.state == "running"

    run(scenario())


def test_first_start_failure_marks_the_component_failed() -> None:
    async def scenario() -> None:
        w = World()
        w.health_script = [NotHealthy("not healthy within start_timeout 30s")]
        c = w.component()
        with pytest.raises(RotationFailed):
            await c.rotate()
        assert c.state == "failed" and c.active is None and w.route.target is None
        assert c.status()["last_error"].endswith("not healthy within start_timeout 30s")

    run(scenario())


def test_second_rotation_waits_for_the_first() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        w.gate = asyncio.Event()
        first = asyncio.ensure_future(c.rotate())
        await asyncio.sleep(0)
        second = asyncio.ensure_future(c.rotate())
        await asyncio.sleep(0)
        assert "waiting" in w.kinds()
        assert len(w.instances) == 2  # the second has not spawned yet
        w.gate.set()
        await asyncio.gather(first, second)
        assert len(w.instances) == 3 and c.restarts == 2
        spawned = [e.data["pid"] for e in w.events if e.kind == "spawned"]
        switched = [e.data["pid"] for e in w.events if e.kind == "switched"]
        assert spawned == switched  # never interleaved

    run(scenario())


def test_drain_waits_for_requests_in_flight_on_the_old_target() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        old = w.route.target
        assert old is not None
        old.acquire()  # a request bound to the old instance
        rotation = asyncio.ensure_future(c.rotate())
        for _ in range(20):
            await asyncio.sleep(0)
        assert w.route.target is not old  # switched already
        assert not rotation.done() and w.instances[0].stopped_with is None
        assert c.status()["draining"] == [
            {"pid": 1000, "port": 9001, "socket": None, "in_flight": 1}
        ]
        old.release()
        await rotation
        assert w.instances[0].stopped_with == signal.SIGTERM
        drained = next(e for e in w.events if e.kind == "drained")
        assert drained.data["requests"] == 1

    run(scenario())


def test_active_instance_exiting_is_replaced() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        w.instances[0].exit.set_result(137)
        for _ in range(50):
            await asyncio.sleep(0)
            if len(w.instances) == 2 and c.state == "running":
                break
        assert c.state == "running" and len(w.instances) == 2
        assert w.route.target is not None and w.route.target.port == 9002
        assert c.last_exit == 137 and c.restarts == 1
        assert "exited" in w.kinds()

    run(scenario())


def test_a_replica_that_exits_during_a_roll_gets_the_roll_s_new_instance() -> None:
    # Replica 2 exits while the roll is still at replica 0: its slot is empty when the
    # roll reaches it. The new instance started for it fills it (no instance is left
    # running outside the set), and the crash's replacement, now needless, is called off.
    async def scenario() -> None:
        w = World()
        c = w.component(dataclasses.replace(SPEC, replicas=3, ports=(9001, 9002, 9003, 9004)))
        await c.rotate()
        assert sorted(c.serving) == [0, 1, 2] and len(w.instances) == 3
        w.gate = asyncio.Event()
        roll = asyncio.ensure_future(c.rotate())
        await settle()
        assert len(w.instances) == 4  # replica 0's new instance, at its health gate
        w.instances[2].exit.set_result(-9)
        await settle()
        assert 2 not in c.serving and len(w.route.targets) == 2
        w.gate.set()
        await roll
        await w.clock.advance(10)
        serving = {slot: s.instance for slot, s in c.serving.items()}
        assert sorted(serving) == [0, 1, 2] and c.state == "running"
        assert [inst.pid for inst in serving.values()] == [1003, 1004, 1005]
        assert len(w.instances) == 6  # no replacement besides the roll's
        assert all(inst.stopped_with is not None for inst in w.instances[:3])
        assert len(w.route.targets) == 3
        assert c.last_error is None and c.restarts == 1

    run(scenario())


def test_crash_loop_ends_in_failed_and_a_restart_revives() -> None:
    async def scenario() -> None:
        w = World()
        spec = dataclasses.replace(
            SPEC,
            restart=RestartPolicy(max_restarts=3, restart_backoff=1.0, restart_backoff_max=4.0),
        )
        c = w.component(spec)
        await c.rotate()
        w.health_script = [NotHealthy("exited with code 1 before becoming healthy")] * 10
        w.instances[0].exit.set_result(1)
        await w.clock.advance(0.5)
        assert c.state == "starting" and len(w.instances) == 2  # the first attempt, at once
        await w.clock.advance(60)
        assert c.state == "failed"
        backoffs = [e.message for e in w.events if e.kind == "backoff"]
        assert backoffs == ["next restart attempt in 1s", "next restart attempt in 2s"]
        assert len(w.instances) == 1 + 3  # the crashed one and max_restarts attempts
        assert w.route.target is None and not w.route.holding  # 503 at once now
        assert "gave up after 3 restarts" in (c.last_error or "")
        w.health_script = []
        await c.rotate()  # a manual restart clears it
        assert c.state == "running" and w.route.holding

    run(scenario())


def test_unhealthy_instance_is_replaced_while_it_keeps_serving() -> None:
    async def scenario() -> None:
        w = World()
        spec = dataclasses.replace(SPEC, health=HealthSpec(interval=1.0, unhealthy_threshold=2))
        c = w.component(spec)
        await c.rotate()
        w.probe_script = ["/health answered 500", "/health answered 500"]
        await w.clock.advance(1.5)
        assert w.kinds().count("check_failed") == 1 and w.route.target.port == 9001  # type: ignore[union-attr]
        await w.clock.advance(1.0)
        assert len(w.instances) == 2 and c.state == "running" and not c.draining
        assert w.route.target is not None and w.route.target.port == 9002
        assert w.instances[0].stopped_with == signal.SIGTERM  # replaced, then stopped
        assert "unhealthy" in w.kinds()  # once, at the threshold...
        assert w.kinds().count("check_failed") >= 2  # ...after one event per failed check

    run(scenario())


def test_deploy_with_failed_verify_rolls_back_to_the_old_instance() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        old_target = w.route.target
        new_spec = dataclasses.replace(
            SPEC, verify=10.0, health=HealthSpec(interval=1.0, unhealthy_threshold=2)
        )
        failed = "/health answered 500"
        w.probe_script = [None, failed, None, failed, failed]
        deploy = asyncio.ensure_future(c.deploy(new_spec))
        await w.clock.advance(4.5)  # failures, but never two in a row
        assert not deploy.done() and w.route.target is not old_target
        await w.clock.advance(1.0)
        with pytest.raises(RotationFailed, match="failed 2 health checks in a row"):
            await deploy
        assert w.route.target is old_target and c.active is w.instances[0]
        assert c.spec is SPEC and c.definition_source == "config"
        for _ in range(20):
            await asyncio.sleep(0)
        assert w.instances[1].stopped_with == signal.SIGTERM and w.instances[0].stopped_with is None

    run(scenario())


def test_deploy_with_verify_keeps_a_new_instance_that_stays_healthy_for_the_window() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        new_spec = dataclasses.replace(SPEC, verify=3.0, health=HealthSpec(interval=1.0))
        w.probe_script = ["/health answered 500", None, "/health answered 500"]
        deploy = asyncio.ensure_future(c.deploy(new_spec))
        await w.clock.advance(2.5)
        assert not deploy.done()
        await w.clock.advance(1.0)
        await deploy
        assert c.spec is new_spec and c.active is w.instances[1]
        assert "verified" in w.kinds()

    run(scenario())


def test_deploy_then_rollback_switch_definitions() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        v2 = dataclasses.replace(SPEC, env=MappingProxyType({"VERSION": "2"}))
        await c.deploy(v2)
        assert c.spec is v2 and c.definition_source == "deployed" and c.previous is SPEC
        assert c.record().definition == {
            "command": ["app", "--port", "{port}"],
            "cwd": "/",
            "env": {"VERSION": "2"},
        }
        await c.rollback()
        assert c.spec is SPEC and c.definition_source == "config" and c.previous is v2
        assert len(w.instances) == 3

    run(scenario())


def test_a_reload_that_rotates_applies_its_proxy_settings_too() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        new = dataclasses.replace(
            SPEC,
            env=MappingProxyType({"VERSION": "2"}),  # an instance field: a rotation
            proxy=dataclasses.replace(SPEC.proxy, read_timeout=7.0, hold_timeout=0.5),
        )
        await c.reconfigure(new, rotate=True)
        assert c.spec is new and len(w.instances) == 2
        assert (c.route.limits.read_timeout, c.route.hold_timeout) == (7.0, 0.5)
        tuned = dataclasses.replace(new, proxy=dataclasses.replace(new.proxy, max_headers=9))
        await c.reconfigure(tuned, rotate=False)  # in place: no new instance
        assert len(w.instances) == 2 and c.route.limits.max_headers == 9

    run(scenario())


def test_stop_drains_and_stops_everything() -> None:
    async def scenario() -> None:
        w = World()
        c = w.component()
        await c.rotate()
        await c.stop()
        assert c.state == "stopped" and w.route.target is None and c.active is None
        assert w.instances[0].stopped_with == signal.SIGTERM

    run(scenario())


# -- transport: unix ----------------------------------------------------------------------


def test_choose_socket_goes_round_robin_and_skips_used_and_busy_paths() -> None:
    pool = ("/s/web.0.sock", "/s/web.1.sock", "/s/web.2.sock", "/s/web.3.sock")
    states = {"/s/web.2.sock": SocketState.BUSY, "/s/web.3.sock": SocketState.STALE}
    probed: list[str] = []

    def probe(path: str) -> SocketState:
        probed.append(path)
        return states.get(path, SocketState.FREE)

    assert choose_socket(pool, None, set(), probe) == ("/s/web.0.sock", SocketState.FREE)
    assert choose_socket(pool, "/s/web.0.sock", set(), probe) == (
        "/s/web.1.sock",
        SocketState.FREE,
    )
    probed.clear()
    # After web.1: web.2 is held by a foreign listener, web.3 is a stale file (usable).
    assert choose_socket(pool, "/s/web.1.sock", set(), probe) == (
        "/s/web.3.sock",
        SocketState.STALE,
    )
    assert probed == ["/s/web.2.sock", "/s/web.3.sock"]
    probed.clear()
    # Paths of our own live instances are never probed (a live listener would be BUSY anyway).
    assert choose_socket(pool, "/s/web.2.sock", {"/s/web.3.sock", "/s/web.0.sock"}, probe) == (
        "/s/web.1.sock",
        SocketState.FREE,
    )
    assert probed == ["/s/web.1.sock"]
    with pytest.raises(NoFreeSocket, match=re.escape("no free socket in the pool /s/web.0.sock")):
        choose_socket(pool, None, set(pool[:2]), lambda _: SocketState.BUSY)


def test_probe_socket_tells_free_stale_and_busy_apart(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sock")
    assert probe_socket(path) is SocketState.FREE
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        assert probe_socket(path) is SocketState.BUSY  # someone listens
    assert probe_socket(path) is SocketState.STALE  # the file stayed, nobody listens
    regular = tmp_path / "plain"
    regular.write_text("not a socket")
    assert probe_socket(str(regular)) is SocketState.BUSY  # never removed


class UnixWorld(World):
    """The same side effects, for a `transport: unix` component."""

    def __init__(self, sockets: tuple[str, ...]) -> None:
        super().__init__()
        self.sockets = sockets
        self.socket_states: dict[str, SocketState] = {}
        self.health_calls: list[tuple[int, str | None]] = []

    async def spawn(
        self,
        name: str,
        endpoint: Endpoint,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        log: Path,
        marker: str,
        replica: int = 0,
    ) -> Any:
        socket_path = env["ROTATOR_SOCKET"]
        assert endpoint.path == socket_path and endpoint.port == 0
        assert argv == ["app", "--unix", socket_path] and "PORT" not in env
        Path(socket_path).write_text("")  # where the instance would bind
        inst = FakeInstance(1000 + len(self.instances), endpoint, replica)
        self.instances.append(inst)
        return inst

    def component(self, spec: ComponentSpec | None = None) -> Component:
        spec = spec or dataclasses.replace(
            SPEC,
            ports=(),
            transport="unix",
            sockets=self.sockets,
            command=("app", "--unix", "{socket}"),
        )
        return Component(
            spec,
            self.route,
            self.bus,
            health=UnixHealth(self),
            log_dir=Path("/dev/null"),
            spawn=self.spawn,
            probe=self.probe,
            socket_probe=lambda path: self.socket_states.get(path, SocketState.FREE),
        )


class UnixHealth(ScriptedHealth):
    world: UnixWorld

    async def wait_until_healthy(
        self, endpoint: Endpoint, exited: Awaitable[int], **_: object
    ) -> float:
        self.world.health_calls.append((endpoint.port, endpoint.path))
        return await self.world.wait_until_healthy(endpoint, exited)

    async def probe(self, endpoint: Endpoint, **_: object) -> str | None:
        self.world.health_calls.append((endpoint.port, endpoint.path))
        return await super().probe(endpoint)


def test_unix_component_rotates_between_socket_paths(tmp_path: Path) -> None:
    async def scenario() -> None:
        sockets = tuple(str(tmp_path / f"web.{n}.sock") for n in range(3))
        w = UnixWorld(sockets)
        c = w.component()
        await c.rotate()
        target = w.route.target
        assert target is not None and target.path == sockets[0] and target.port == 0
        assert w.health_calls == [(0, sockets[0])]
        status = c.status()["active"]
        assert status["port"] is None and status["socket"] == sockets[0]
        recorded = c.record().active  # recorded with its path: adopted after a crash
        assert recorded is not None and recorded.socket == sockets[0] and recorded.port is None
        await c.rotate()
        assert w.route.target is not None and w.route.target.path == sockets[1]
        assert not Path(sockets[0]).exists()  # removed once its instance stopped
        assert Path(sockets[1]).exists()
        switched = [e for e in w.events if e.kind == "switched"][-1]
        assert switched.message == "switched web.0.sock -> web.1.sock (pid 1001)"
        assert switched.data["socket"] == sockets[1]

    run(scenario())


def test_unix_component_removes_a_stale_socket_and_skips_a_busy_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        sockets = tuple(str(tmp_path / f"web.{n}.sock") for n in range(3))
        w = UnixWorld(sockets)
        c = w.component()
        await c.rotate()
        Path(sockets[1]).write_text("")
        Path(sockets[2]).write_text("")
        w.socket_states = {sockets[1]: SocketState.BUSY, sockets[2]: SocketState.STALE}
        await c.rotate()
        assert w.route.target is not None and w.route.target.path == sockets[2]
        assert Path(sockets[1]).exists()  # someone else's: left alone
        assert any(e.kind == "socket" and sockets[2] in e.message for e in w.events)

    run(scenario())


def test_crashed_unix_instance_is_replaced_on_the_next_path_and_its_socket_removed(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        sockets = tuple(str(tmp_path / f"web.{n}.sock") for n in range(2))
        w = UnixWorld(sockets)
        c = w.component()
        await c.rotate()
        w.instances[0].exit.set_result(137)
        for _ in range(50):
            await asyncio.sleep(0)
            if len(w.instances) == 2 and c.state == "running":
                break
        assert w.route.target is not None and w.route.target.path == sockets[1]
        assert not Path(sockets[0]).exists() and Path(sockets[1]).exists()
        await c.stop()
        assert not Path(sockets[1]).exists()

    run(scenario())
