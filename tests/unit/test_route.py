"""A Route's balancing set and its choice of Target (route.pick), with in-flight counts set
by hand: no sockets. The same choices through a real proxy: tests/integration/test_balance.py."""

from __future__ import annotations

import asyncio

from rotator.config import Endpoint
from rotator.proxy.route import Limits, Route, Target


def targets(n: int) -> list[Target]:
    return [Target(Endpoint("127.0.0.1", 9001 + i), label=f"t{i}") for i in range(n)]


def route_over(ts: list[Target], hold_timeout: float = 1.0) -> Route:
    route = Route("web", Limits(hold_timeout=hold_timeout))
    for t in ts:
        route.add(t)
    return route


def test_pick_takes_the_target_with_the_fewest_in_flight() -> None:
    a, b, c = targets(3)
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    route = route_over([a, b, c])
    assert [route.pick() for _ in range(5)] == [b] * 5
    b.in_flight = 4
    assert route.pick() is c


def test_pick_breaks_ties_in_turn() -> None:
    a, b, c = targets(3)
    route = route_over([a, b, c])
    assert [route.pick() for _ in range(6)] == [a, b, c, a, b, c]
    # Only the tied take turns: the busier one is never picked meanwhile.
    b.in_flight = 1
    assert [route.pick() for _ in range(6)] == [a, c] * 3


def test_pick_never_takes_the_excluded_target() -> None:
    a, b = targets(2)
    b.in_flight = 10
    route = route_over([a, b])
    assert [route.pick(exclude=a) for _ in range(3)] == [b] * 3
    assert route_over([a]).pick(exclude=a) is None
    assert route_over([a]).pick(exclude=b) is a


def test_pick_from_an_empty_set_is_none() -> None:
    route = Route("web")
    assert route.pick() is None and route.target is None and route.targets == ()
    a, b = targets(2)
    route.add(a)
    route.add(b)
    assert route.remove(a) and route.remove(b)
    assert route.pick() is None and route.only is None


def test_one_target_is_the_shortcut_and_the_first() -> None:
    a, b = targets(2)
    route = route_over([a])
    assert route.only is a and route.target is a and route.pick() is a
    route.add(b)
    assert route.only is None and route.target is a  # `active`: the first of the set
    route.remove(a)
    assert route.only is b and route.target is b


def test_add_remove_replace_swap_change_the_set_in_one_step() -> None:
    a, b, c = targets(3)
    route = route_over([a, b])
    route.add(a)  # already in: no second place in the set
    assert route.targets == (a, b)
    assert not route.remove(c)
    route.replace(a, c)  # takes a's place: c is now the first
    assert route.targets == (c, b)
    route.replace(a, a)  # a was not in the set: it joins
    assert route.targets == (c, b, a)
    route.replace(c, a)  # a moves to c's place, never in the set twice
    assert route.targets == (a, b)
    assert route.swap(b) is a and route.targets == (b,)
    assert route.swap(None) is b and route.targets == ()
    assert route.swap(a) is None and route.targets == (a,)


def test_a_removed_target_is_never_picked() -> None:
    a, b = targets(2)
    route = route_over([a, b])
    a.in_flight = 0
    b.in_flight = 5  # a would win every pick
    route.remove(a)
    assert {route.pick() for _ in range(4)} == {b}


def test_held_request_goes_as_soon_as_a_target_is_added() -> None:
    async def scenario() -> None:
        a, b = targets(2)
        route = route_over([], hold_timeout=5.0)
        held = asyncio.ensure_future(route.wait_target())
        await asyncio.sleep(0)
        assert not held.done()
        route.add(b)
        assert await asyncio.wait_for(held, 1) is b
        # Waiting for one other than `a`, which failed: with b in the set, at once.
        route.add(a)
        assert await route.wait_target(exclude=a) is b

    asyncio.run(scenario())


def test_wait_for_another_than_the_failed_one() -> None:
    async def scenario() -> None:
        a, b = targets(2)
        route = route_over([a], hold_timeout=5.0)
        held = asyncio.ensure_future(route.wait_target(exclude=a))
        await asyncio.sleep(0.01)
        assert not held.done()  # a is there, but it just failed
        route.replace(a, b)
        assert await asyncio.wait_for(held, 1) is b

    asyncio.run(scenario())


def test_held_request_waits_on_when_the_target_that_woke_it_left_again() -> None:
    async def scenario() -> None:
        a, b = targets(2)
        route = route_over([], hold_timeout=5.0)
        held = asyncio.ensure_future(route.wait_target())
        await asyncio.sleep(0)
        route.add(a)
        route.remove(a)  # before the held request ran: it must not get a, nor give up
        await asyncio.sleep(0.01)
        assert not held.done()
        route.add(b)
        assert await asyncio.wait_for(held, 1) is b

    asyncio.run(scenario())


def test_wait_gives_up_after_hold_timeout_and_at_once_when_not_holding() -> None:
    async def scenario() -> None:
        route = route_over([], hold_timeout=0.05)
        assert await route.wait_target() is None
        route.holding = False
        route.limits = Limits(hold_timeout=5.0)
        assert await asyncio.wait_for(route.wait_target(), 1) is None

    asyncio.run(scenario())


def test_served_counts_only_answered_requests() -> None:
    (a,) = targets(1)
    a.acquire()
    a.acquire()
    a.release(answered=False)  # it failed (refused, reset): retried elsewhere
    a.release()
    assert (a.in_flight, a.served) == (0, 1)
