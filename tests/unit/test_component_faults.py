"""The rotation state machine when things go wrong: starts that raise, crash loops, and
the states they show. Fake instances (see test_component.py): no processes, no sockets."""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Any

import pytest

from rotator.component import RotationFailed
from rotator.config import RestartPolicy
from rotator.events import Event, EventBus
from tests.unit.test_component import SPEC, World, run, settle


class FailingWorld(World):
    """Spawns fail with `errors` (one per spawn, None = a normal start) while it has any."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException | None] = []

    async def spawn(self, *args: Any, **kwargs: Any) -> Any:
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        return await super().spawn(*args, **kwargs)


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/state/logs/web/.x.starting")


async def until(w: World, predicate: Any, timeout: float = 60.0) -> None:
    """Step the world's clock, 10 ms at a time, until `predicate` holds."""
    deadline = w.clock.now() + timeout
    await settle()
    while not predicate():
        assert w.clock.now() < deadline, "timed out"
        await w.clock.advance(0.01)


def test_an_oserror_while_recovering_is_a_failed_start_retried_with_backoff() -> None:
    async def scenario() -> None:
        w = FailingWorld()
        spec = dataclasses.replace(
            SPEC,
            restart=RestartPolicy(max_restarts=5, restart_backoff=0.001, restart_backoff_max=0.002),
        )
        c = w.component(spec)
        await c.rotate()
        w.errors = [ENOSPC, ENOSPC]
        w.instances[0].exit.set_result(137)
        await until(w, lambda: c.state == "running" and len(w.instances) == 2)
        failures = [e.message for e in w.events if e.kind == "failed"]
        assert len(failures) == 2
        assert failures[0] == (
            "cannot start 'app': No space left on device (ENOSPC): /state/logs/web/.x.starting"
        )
        assert w.kinds().count("backoff") == 2 and c.last_error is None

    run(scenario())


def test_a_start_that_always_raises_ends_failed_after_max_restarts() -> None:
    async def scenario() -> None:
        w = FailingWorld()
        spec = dataclasses.replace(
            SPEC,
            restart=RestartPolicy(max_restarts=3, restart_backoff=0.001, restart_backoff_max=0.002),
        )
        c = w.component(spec)
        await c.rotate()
        w.errors = [ENOSPC] * 10
        w.instances[0].exit.set_result(137)
        await until(w, lambda: c.state == "failed")
        assert w.kinds().count("restarting") == 3 and len(w.errors) == 10 - 3
        assert "gave up after 3 restarts" in (c.last_error or "")
        assert "ENOSPC" in (c.last_error or "")

    run(scenario())


@pytest.mark.parametrize("error", [ENOSPC, RuntimeError("a bug")])
def test_a_manual_restart_that_raises_fails_and_leaves_the_old_instance(
    error: BaseException,
) -> None:
    async def scenario() -> None:
        w = FailingWorld()
        c = w.component()
        await c.rotate()
        w.errors = [error]
        with pytest.raises(RotationFailed, match=r"^(cannot start 'app'|the start failed): "):
            await c.rotate()
        assert c.state == "running" and c.active is w.instances[0]
        assert w.route.target is not None and w.route.target.port == 9001

    run(scenario())


def test_a_crash_loop_is_starting_between_attempts_and_gives_up_without_a_last_wait() -> None:
    async def scenario() -> None:
        w = World()
        # A wait before giving up would show in the clock's time.
        spec = dataclasses.replace(
            SPEC,
            restart=RestartPolicy(max_restarts=2, restart_backoff=0.2, restart_backoff_max=0.2),
        )
        c = w.component(spec)
        seen: list[tuple[str, bool]] = []
        w.bus.subscribe(lambda _: seen.append((c.state, c.active is not None)))
        await c.rotate()
        began = w.clock.now()
        for n in range(3):  # each replacement comes up healthy, then crashes
            w.instances[n].exit.set_result(1)
            await until(w, lambda n=n: len(w.instances) == n + 2 or c.state == "failed")
            if c.state != "failed":
                await until(w, lambda: c.state == "running")
        await until(w, lambda: c.state == "failed")
        took = w.clock.now() - began
        # Two attempts: the first at once, the second after one backoff (0.2 s); then
        # the budget is spent and the third crash gives up at once.
        assert len(w.instances) == 1 + 2
        assert 0.2 <= took < 0.35, took
        assert ("running", False) not in seen  # never "running" without an instance
        assert ("starting", False) in seen

    run(scenario())


def test_a_raising_subscriber_is_kept_and_reported_once() -> None:
    reported: list[str] = []
    bus = EventBus(on_error=lambda sub, exc: reported.append(str(exc)))
    got: list[str] = []

    def broken(event: Any) -> None:
        got.append(event.kind)
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    bus.subscribe(broken)
    after: list[str] = []
    bus.subscribe(lambda e: after.append(e.kind))
    for kind in ("one", "two", "three"):
        bus.publish(Event("web", kind, "..."))
    assert got == ["one", "two", "three"] and after == got  # kept, and the others still hear
    assert reported == ["[Errno 32] Broken pipe"]  # once
