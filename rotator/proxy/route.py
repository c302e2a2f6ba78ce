"""Where a component's traffic goes: its Route and the Targets it balances over.

A Target is one instance as the proxy sees it: an address, the requests in
flight on it and its keep-alive connections. A Route holds the component's
balancing set of Targets (its replicas); `pick()` chooses one per request, the
one with the fewest requests in flight, ties taken in turn. A request is bound
to the Target picked when it starts and stays there (unless that Target failed
before answering: see protocol.Exchange). `add()`, `remove()`, `replace()`
and `swap()` change the set in one step on the event loop.

While a canary runs, the Route holds a second set, the canary's: each request
goes to it with probability `canary_weight` %, or to the side a client named
(X-Rotator-Canary, read in protocol.py), and within a set by the same rule.
Each side then counts its answers in Figures (requests, errors, a latency
histogram for p95) for the component to judge; deciding is not done here.

The Route also counts the requests answered through it (by status class, and
a duration histogram), and its listener's client connections (open, closed to
make room, refused at a cap), in plain numbers that metrics.py reads at scrape time.

No sockets are opened here; connections register themselves (see upstream.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from bisect import bisect_left
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

from rotator.config import Endpoint, ProxySpec

if TYPE_CHECKING:
    from rotator.proxy.upstream import UpstreamConnection

# The proxy's clock (seconds), for durations and timeouts. Not the event loop's: uvloop's
# counts whole milliseconds and stands still within a pass of the loop, too coarse for
# the duration of a fast request, which a canary's p95 is judged on. It costs the same.
clock = perf_counter
# Idle keep-alive connections kept per target; more would only hold sockets
# (and file descriptors) open on the instance for no benefit.
MAX_IDLE_PER_TARGET = 64
# Upper bounds (seconds) of the request duration histogram's buckets; one more
# bucket past the last counts everything slower (Prometheus' +Inf).
DURATION_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Upper bounds (seconds) of a canary side's latency histogram: 0.1 ms to 60 s, each 5%
# above the one before (273 buckets). A quantile read as its bucket's geometric middle
# is then within 2.5% of the true one, and recording is one bisect over a fixed list.
LATENCY_GROWTH = 1.05
LATENCY_BOUNDS = tuple(
    1e-4 * LATENCY_GROWTH**i for i in range(math.ceil(math.log(60 / 1e-4, LATENCY_GROWTH)) + 1)
)


# What the proxy allows, per component: the config's own object (docs/configuration.md).
Limits = ProxySpec


class Figures:
    """What one side of a canary (its instances, or the stable ones) answered since the
    last reset: requests, errors (status >= 500, the proxy's own 502/503/504 included)
    and a latency histogram (LATENCY_BOUNDS) to read p95 from. Recording allocates
    nothing lasting; reading walks the histogram once."""

    __slots__ = ("buckets", "errors", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        # Per bucket, not cumulative; the last counts everything above LATENCY_BOUNDS.
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)

    def __repr__(self) -> str:
        return f"<Figures requests={self.requests} errors={self.errors} p95={self.p95()}>"

    def record(self, status: int, seconds: float) -> None:
        """An answer with `status`, `seconds` after its request head arrived."""
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self.buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1

    def failed(self) -> None:
        """An attempt that failed before any answer (refused, reset) and went on to
        another instance: an error of this side, though the client was answered by the
        other. Not in the histogram: it measures answers, and a refusal takes no time."""
        self.requests += 1
        self.errors += 1

    def reset(self) -> None:
        self.requests = self.errors = 0
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)

    def p95(self) -> float | None:
        return self.quantile(0.95)

    def quantile(self, q: float) -> float | None:
        """The latency (seconds) that a fraction `q` of the answers took at most (nearest
        rank), to within 2.5%; None before any answer. Below 0.1 ms reads as 0.1 ms,
        above 60 s as 60 s."""
        total = sum(self.buckets)
        if not total:
            return None
        rank = max(1, math.ceil(q * total))
        at = seen = 0
        while seen + self.buckets[at] < rank:
            seen += self.buckets[at]
            at += 1
        if at == 0:
            return LATENCY_BOUNDS[0]
        if at == len(LATENCY_BOUNDS):
            return LATENCY_BOUNDS[-1]
        return math.sqrt(LATENCY_BOUNDS[at - 1] * LATENCY_BOUNDS[at])


class Target:
    """One instance: where to connect, what is in flight, which connections are open.

    Where to connect is its Endpoint: host:port, or a Unix socket path (the instance of
    a `transport: unix` component). Its parts are kept as attributes of their own too,
    for the hot path.
    """

    __slots__ = (
        "_drained",
        "canary",
        "connections",
        "endpoint",
        "figures",
        "host",
        "idle",
        "in_flight",
        "label",
        "path",
        "port",
        "retired",
        "served",
    )

    def __init__(self, endpoint: Endpoint, label: str = "") -> None:
        self.endpoint = endpoint
        self.host, self.port, self.path = endpoint.host, endpoint.port, endpoint.path
        self.label = label or self.path or f"{self.host}:{self.port}"
        self.in_flight = 0  # requests bound here now (an open websocket is one)
        self.served = 0  # requests this instance answered
        self.retired = False
        self.canary = False  # in (or last in) its route's canary set
        # Its side's, while a canary runs (set by the Route), else None: an answer from
        # here is counted there. Kept after it leaves the set, for those still in flight.
        self.figures: Figures | None = None
        self.idle: list[UpstreamConnection] = []
        self.connections: set[UpstreamConnection] = set()
        self._drained: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<Target {self.label} in_flight={self.in_flight}>"

    def acquire(self) -> None:
        self.in_flight += 1

    def release(self, answered: bool = True) -> None:
        """A request bound here is done; `answered`: the instance answered it, in part at
        least (a websocket: when it closes), so it counts in `served`."""
        self.in_flight -= 1
        if answered:
            self.served += 1
        if self.in_flight == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pop_idle(self) -> UpstreamConnection | None:
        while self.idle:
            conn = self.idle.pop()
            if conn.usable:
                return conn
        return None

    def put_idle(self, conn: UpstreamConnection) -> None:
        # A retired target's instance is about to be stopped: pooling would
        # only hand out a connection that is certain to die.
        if self.retired or len(self.idle) >= MAX_IDLE_PER_TARGET:
            conn.close()
        else:
            self.idle.append(conn)

    async def drain(self, timeout: float) -> int:
        """Wait until nothing is in flight here, at most `timeout` seconds.

        Returns how many requests were still in flight at the deadline (0 = drained).
        """
        if self.in_flight == 0:
            return 0
        loop = asyncio.get_running_loop()
        if self._drained is None or self._drained.done():
            self._drained = loop.create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
        return self.in_flight

    def retire(self) -> None:
        """No new request will come here: close the idle pool now, the rest as they finish."""
        self.retired = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def close_all(self) -> None:
        """Cut every connection, busy or idle (used after a drain deadline passed)."""
        self.retire()
        for conn in list(self.connections):
            conn.cut()


class Route:
    """A component's balancing set of Targets; never empty during a rotation, only before
    the first instance is healthy or after the component was stopped. While a canary
    runs, a second set, the canary's, takes `canary_weight` % of the requests."""

    __slots__ = (
        "_draw",
        "_ones",
        "_turns",
        "_waiters",
        "canary_figures",
        "canary_targets",
        "canary_weight",
        "clients",
        "clients_evicted",
        "clients_refused",
        "codes",
        "duration_sum",
        "durations",
        "holding",
        "limits",
        "name",
        "only",
        "requests",
        "stable_figures",
        "targets",
    )

    def __init__(
        self,
        name: str,
        limits: Limits | None = None,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.limits = limits or Limits()
        # False while the component is stopped on purpose: no instance is coming,
        # so requests are answered 503 at once instead of being held.
        self.holding = True
        # Replaced whole on each change, never changed in place: read-only to callers,
        # and safe to iterate while a change happens. `targets` is the stable set (all
        # of them when no canary runs); a Target is in one set at most.
        self.targets: tuple[Target, ...] = ()
        self.canary_targets: tuple[Target, ...] = ()
        # The share (percent, 0-100) of requests drawn for the canary set while it has a
        # target; set by the component. 0 sends it only the requests that ask for it.
        self.canary_weight = 0
        # Per request, a number in [0, 1) that decides the side: random, so that no
        # pattern of requests (a client's every tenth) can steer a side's share.
        self._draw = draw
        # The target when there is exactly one and no canary, else None: a request's
        # shortcut past pick() (most components have one instance, and this is per request).
        self.only: Target | None = None
        self._turns = [0, 0]  # per set (stable, canary): where its next pick starts looking
        # Per set (stable, canary): its target when it has exactly one, else None.
        self._ones: tuple[Target | None, Target | None] = (None, None)
        # Counters of answered requests, read by metrics.py at scrape time: the
        # hot path only adds to plain numbers.
        self.requests = 0
        self.codes = [0] * 10  # by status class: codes[2] counts the 2xx
        self.durations = [0] * (len(DURATION_BOUNDS) + 1)  # per bucket, not cumulative
        self.duration_sum = 0.0
        # Each side's answers while a canary runs (see reset_figures).
        self.stable_figures = Figures()
        self.canary_figures = Figures()
        self.clients = 0  # client connections open on the component's address
        self.clients_evicted = 0  # idle ones closed to make room at a cap
        self.clients_refused = 0  # new ones answered 503 at a cap, none being idle
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def hold_timeout(self) -> float:
        return self.limits.hold_timeout

    @property
    def target(self) -> Target | None:
        """The first target of the stable set (status's `active`), or None."""
        return self.targets[0] if self.targets else None

    # -- the balancing sets --------------------------------------------------------
    def add(self, target: Target, canary: bool = False) -> None:
        """`target` joins the stable set, or the canary's (it is healthy); requests held
        for one go now. One in the other set moves (a canary promoted in place)."""
        if target not in (self.canary_targets if canary else self.targets):
            stable, canaries = self._without(target)
            if canary:
                self._set(stable, (*canaries, target))
            else:
                self._set((*stable, target), canaries)
        self._wake()

    def remove(self, target: Target) -> bool:
        """`target` leaves its set at once: no new request picks it, those in flight on it
        finish (draining it is the caller's). False if it was in neither set."""
        if target not in self.targets and target not in self.canary_targets:
            return False
        self._set(*self._without(target))
        return True

    def replace(self, old: Target, new: Target) -> None:
        """`new` takes `old`'s place, in whichever set holds `old`, in one step (leaving
        the other set if it was there); added to the stable set if `old` is in neither."""
        stable, canaries = self._without(new)
        if old in stable:
            self._set(tuple(new if t is old else t for t in stable), canaries)
        elif old in canaries:
            self._set(stable, tuple(new if t is old else t for t in canaries))
        else:
            self._set((*stable, new), canaries)
        self._wake()

    def swap(self, new: Target | None) -> Target | None:
        """The stable set becomes `new` alone (or empty), in one step; the first target it
        replaced. The one-instance rotation."""
        old = self.target
        canaries = self._without(new)[1] if new is not None else self.canary_targets
        self._set((new,) if new is not None else (), canaries)
        if new is not None:
            self._wake()
        return old

    def reset_figures(self) -> None:
        """Each side's figures start again from zero (a canary's start)."""
        self.stable_figures.reset()
        self.canary_figures.reset()

    def _without(self, target: Target) -> tuple[tuple[Target, ...], tuple[Target, ...]]:
        """Both sets, `target` taken out of whichever holds it."""
        stable, canaries = self.targets, self.canary_targets
        if target in stable:
            stable = tuple(t for t in stable if t is not target)
        elif target in canaries:
            canaries = tuple(t for t in canaries if t is not target)
        return stable, canaries

    def _set(self, targets: tuple[Target, ...], canaries: tuple[Target, ...]) -> None:
        self.targets = targets
        self.canary_targets = canaries
        running = bool(canaries)
        one = targets[0] if len(targets) == 1 else None
        self._ones = (one, canaries[0] if len(canaries) == 1 else None)
        self.only = None if running else one
        # Sides are counted only while a canary runs: without one, an answer costs the
        # check of `figures` and nothing more.
        stable = self.stable_figures if running else None
        for t in targets:
            t.canary, t.figures = False, stable
        for t in canaries:
            t.canary, t.figures = True, self.canary_figures

    def _wake(self) -> None:
        """A target joined: the requests held for one pick theirs now."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def pick(self, exclude: Target | None = None, canary: bool | None = None) -> Target | None:
        """The target for a request: the one with the fewest requests in flight, ties
        broken round-robin, never `exclude`; None if there is no other.

        Least outstanding requests (HAProxy's leastconn, nginx's least_conn, counted
        per request here): a slow replica holds its requests longer, so it gets fewer.

        While a canary runs, the set is chosen first: the canary's with probability
        canary_weight %, or the one `canary` names (True: the canary's, False: the
        stable one); the other set when the chosen one has no target but `exclude`."""
        if self.canary_targets:
            if canary is None:
                canary = self._draw() * 100 < self.canary_weight
            one = self._ones[canary]
            if one is not None and one is not exclude:  # most often: one on each side
                return one
            first, then = self.targets, self.canary_targets
            if canary:
                first, then = then, first
            return self._least(first, canary, exclude) or self._least(then, not canary, exclude)
        targets = self.targets
        n = len(targets)
        if n == 1:  # the common case, on every request: as cheap as it can be
            only = targets[0]
            return only if only is not exclude else None
        return self._least(targets, False, exclude)

    def _least(
        self, targets: tuple[Target, ...], canary: bool, exclude: Target | None
    ) -> Target | None:
        """Of `targets` (the set `canary` says), the one with the fewest in flight."""
        n = len(targets)
        if n == 0:
            return None
        # Look from the one after the set's last pick: of the tied, each gets its turn.
        start = self._turns[canary]
        best: Target | None = None
        at = 0
        for i in range(start, start + n):
            t = targets[i % n]
            if t is not exclude and (best is None or t.in_flight < best.in_flight):
                best, at = t, i
        self._turns[canary] = (at + 1) % n
        return best

    def answered(self, status: int, seconds: float) -> None:
        """A client got its whole answer (`status`), `seconds` after its request head arrived."""
        self.requests += 1
        self.codes[status // 100 % 10] += 1
        self.durations[bisect_left(DURATION_BOUNDS, seconds)] += 1
        self.duration_sum += seconds

    async def wait_target(
        self, exclude: Target | None = None, canary: bool | None = None
    ) -> Target | None:
        """A target for a request (other than `exclude`, one that just failed; on the
        side `canary` names, as pick), waiting up to hold_timeout for one to join either
        set; None if none came. Once one joined, `exclude` is taken too if it is all
        there is: it was added back on purpose."""
        target = self.pick(exclude, canary)
        if target is not None or not self.holding:
            return target
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_timeout
        # Woken when one joins; it may have left again before this runs: wait on.
        while target is None and (left := deadline - loop.time()) > 0:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                return None
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
            target = self.pick(exclude, canary) or self.pick(None, canary)
        return target
