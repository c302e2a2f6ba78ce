"""A Route's balancing set and its choice of Target (route.pick), with in-flight counts set
by hand: no sockets. The same choices through a real proxy: tests/integration/test_balance.py.
The canary's set, its split and a side's figures: the same, through a real proxy in
tests/integration/test_canary_proxy.py."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Callable

import pytest

from rotator.config import Endpoint
from rotator.proxy.route import LATENCY_BOUNDS, Figures, Limits, Route, Target


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


# -- the canary's set ------------------------------------------------------------------


def scripted(*draws: float) -> Callable[[], float]:
    """A Route's draw that returns `draws` in turn (the split without chance)."""
    it = iter(draws)
    return lambda: next(it)


def with_canary(
    stable: list[Target], canaries: list[Target], weight: int, draw: Callable[[], float]
) -> Route:
    route = Route("web", Limits(hold_timeout=1.0), draw=draw)
    for t in stable:
        route.add(t)
    for t in canaries:
        route.add(t, canary=True)
    route.canary_weight = weight
    return route


def test_a_request_goes_to_the_canary_when_its_draw_falls_under_the_weight() -> None:
    s, c = targets(2)
    route = with_canary([s], [c], 10, scripted(0.0, 0.0999, 0.1, 0.5, 0.05, 0.9999))
    assert [route.pick() for _ in range(6)] == [c, c, s, s, c, s]


def test_weight_0_and_100_send_every_request_to_one_side() -> None:
    s, c = targets(2)
    draws = (0.0, 0.3, 0.9999)
    route = with_canary([s], [c], 0, scripted(*draws))
    assert [route.pick() for _ in draws] == [s, s, s]
    route = with_canary([s], [c], 100, scripted(*draws))
    assert [route.pick() for _ in draws] == [c, c, c]


def test_named_side_wins_over_the_draw_and_draws_nothing() -> None:
    s, c = targets(2)
    route = with_canary([s], [c], 50, scripted())  # a draw would raise StopIteration
    assert [route.pick(canary=True) for _ in range(3)] == [c] * 3
    assert [route.pick(canary=False) for _ in range(3)] == [s] * 3


def test_named_side_without_a_target_falls_back_to_the_other() -> None:
    s, c = targets(2)
    # No canary runs: `always` is as without the header.
    route = with_canary([s], [], 50, scripted())
    assert route.pick(canary=True) is s and route.only is s
    # Only a canary (the stable set emptied, say by a crash): `never` still gets an answer.
    route = with_canary([], [c], 50, scripted(0.9))
    assert route.pick(canary=False) is c and route.pick() is c


def test_each_side_balances_by_least_outstanding_with_its_own_turns() -> None:
    s1, s2, c1, c2 = targets(4)
    route = with_canary([s1, s2], [c1, c2], 50, scripted(*[0.9, 0.1] * 4))
    # Alternating sides, ties taken in turn within each side.
    assert [route.pick() for _ in range(8)] == [s1, c1, s2, c2, s1, c1, s2, c2]
    s1.in_flight, c2.in_flight = 3, 3
    assert [route.pick(canary=side) for side in (False, True, False, True)] == [s2, c1, s2, c1]


def test_retry_prefers_the_failed_side_then_the_other() -> None:
    s, c1, c2 = targets(3)
    route = with_canary([s], [c1, c2], 10, scripted())
    assert route.pick(exclude=c1, canary=True) is c2  # another canary target first
    route.remove(c2)
    assert route.pick(exclude=c1, canary=True) is s  # none left there: never lost
    assert route.pick(exclude=s, canary=False) is c1
    route.remove(c1)
    assert route.pick(exclude=s, canary=False) is None


def test_a_target_is_in_one_set_at_most() -> None:
    s, c, n = targets(3)
    route = with_canary([s], [c], 10, scripted())
    assert route.targets == (s,) and route.canary_targets == (c,)
    assert route.only is None  # the shortcut would skip the split
    route.add(c)  # promoted in place: it moves
    assert route.targets == (s, c) and route.canary_targets == ()
    route.add(c, canary=True)
    assert route.targets == (s,) and route.canary_targets == (c,)
    route.add(c, canary=True)  # already there: nothing changes
    assert route.canary_targets == (c,)
    route.replace(c, n)  # in the set that held the old one
    assert route.targets == (s,) and route.canary_targets == (n,)
    route.replace(s, n)  # leaves the canary set for the stable one
    assert route.targets == (n,) and route.canary_targets == ()
    assert route.only is n
    route.add(c, canary=True)
    assert route.swap(s) is n  # the one-instance rotation leaves the canary alone
    assert route.targets == (s,) and route.canary_targets == (c,)
    assert route.remove(c) and not route.remove(c)
    assert route.canary_targets == () and route.only is s and route.target is s


def test_sides_are_counted_only_while_a_canary_runs() -> None:
    s, c = targets(2)
    route = route_over([s])
    assert s.figures is None  # without a canary an answer costs one check, nothing more
    route.add(c, canary=True)
    assert (s.figures, c.figures) == (route.stable_figures, route.canary_figures)
    assert (s.canary, c.canary) == (False, True)
    route.remove(c)
    assert s.figures is None
    # The canary target keeps its side: those still in flight on it are counted there.
    assert c.figures is route.canary_figures


def test_held_request_goes_to_a_canary_target_that_joins() -> None:
    async def scenario() -> None:
        (c,) = targets(1)
        route = with_canary([], [], 0, scripted(0.5))
        held = asyncio.ensure_future(route.wait_target())
        await asyncio.sleep(0)
        route.add(c, canary=True)
        assert await asyncio.wait_for(held, 1) is c

    asyncio.run(scenario())


def test_the_draw_is_random_by_default() -> None:
    s, c = targets(2)
    route = with_canary([s], [c], 10, random.Random(17).random)
    picks = [route.pick() for _ in range(10_000)]
    assert 900 <= picks.count(c) <= 1100  # 10% of 10,000: 6 standard deviations either side
    # Not a pattern: no fixed spacing between canary requests.
    gaps = {b - a for a, b in itertools.pairwise(i for i, t in enumerate(picks) if t is c)}
    assert len(gaps) > 10
    assert Route("web")._draw is random.random


# -- a side's figures -------------------------------------------------------------------


def nearest_rank(samples: list[float], q: float) -> float:
    return sorted(samples)[math.ceil(q * len(samples)) - 1]


def test_p95_is_within_a_few_percent_of_the_exact_one() -> None:
    rng = random.Random(3)
    cases = {
        "uniform 1-100 ms": [rng.uniform(0.001, 0.1) for _ in range(5000)],
        "lognormal around 12 ms": [rng.lognormvariate(math.log(0.012), 0.6) for _ in range(5000)],
        "a slow tail": [0.002] * 940 + [rng.uniform(0.2, 0.4) for _ in range(60)],
        "one answer": [0.0314],
        "sub-millisecond": [rng.uniform(0.0002, 0.0009) for _ in range(1000)],
    }
    for name, samples in cases.items():
        figures = Figures()
        for seconds in samples:
            figures.record(200, seconds)
        exact = nearest_rank(samples, 0.95)
        got = figures.p95()
        assert got is not None and abs(got - exact) <= 0.025 * exact, (name, got, exact)
        assert figures.quantile(0.5) == pytest.approx(nearest_rank(samples, 0.5), rel=0.025)


def test_figures_count_requests_and_errors_and_reset_to_zero() -> None:
    figures = Figures()
    assert figures.p95() is None and (figures.requests, figures.errors) == (0, 0)
    for status in (200, 404, 499, 500, 502, 503, 504, 101):
        figures.record(status, 0.01)
    figures.failed()  # an attempt refused, then answered by the other side
    assert (figures.requests, figures.errors) == (9, 5)
    assert sum(figures.buckets) == 8  # a failed attempt has no latency
    figures.reset()
    assert (figures.requests, figures.errors, figures.p95()) == (0, 0, None)
    route = Route("web")
    route.stable_figures.record(200, 0.1)
    route.canary_figures.failed()
    route.reset_figures()
    assert route.stable_figures.requests == route.canary_figures.requests == 0


def test_p95_outside_the_histogram_reads_as_its_bound() -> None:
    figures = Figures()
    figures.record(200, 0.0)
    assert figures.p95() == LATENCY_BOUNDS[0] == pytest.approx(1e-4)
    figures.record(200, 3600.0)
    assert figures.p95() == LATENCY_BOUNDS[-1] and LATENCY_BOUNDS[-1] >= 60.0
    # Each bucket 5% wider than the one before: the middle is within 2.5% of any value in it.
    ratios = {round(b / a, 9) for a, b in itertools.pairwise(LATENCY_BOUNDS)}
    assert ratios == {1.05}
