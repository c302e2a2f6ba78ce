"""Where a component's traffic goes: its Route and the Targets it balances over.

A Target is one instance as the proxy sees it: an address, the requests in
flight on it and its keep-alive connections. A Route holds the component's
balancing set of Targets (its replicas); `pick()` chooses one per request, the
one with the fewest requests in flight, ties taken in turn. A request is bound
to the Target picked when it starts and stays there (unless that Target failed
before answering: see protocol.Exchange). `add()`, `remove()`, `replace()`
and `swap()` change the set in one step on the event loop.

The Route also counts the requests answered through it (by status class, and
a duration histogram), and its listener's client connections (open, closed to
make room, refused at a cap), in plain numbers that metrics.py reads at scrape time.

No sockets are opened here; connections register themselves (see upstream.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from bisect import bisect_left
from typing import TYPE_CHECKING

from rotator.config import Endpoint, ProxySpec

if TYPE_CHECKING:
    from rotator.proxy.upstream import UpstreamConnection

# Idle keep-alive connections kept per target; more would only hold sockets
# (and file descriptors) open on the instance for no benefit.
MAX_IDLE_PER_TARGET = 64
# Upper bounds (seconds) of the request duration histogram's buckets; one more
# bucket past the last counts everything slower (Prometheus' +Inf).
DURATION_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# What the proxy allows, per component: the config's own object (docs/configuration.md).
Limits = ProxySpec


class Target:
    """One instance: where to connect, what is in flight, which connections are open.

    Where to connect is its Endpoint: host:port, or a Unix socket path (the instance of
    a `transport: unix` component). Its parts are kept as attributes of their own too,
    for the hot path.
    """

    __slots__ = (
        "_drained",
        "connections",
        "endpoint",
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
    the first instance is healthy or after the component was stopped."""

    __slots__ = (
        "_next",
        "_waiters",
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
        "targets",
    )

    def __init__(self, name: str, limits: Limits | None = None) -> None:
        self.name = name
        self.limits = limits or Limits()
        # False while the component is stopped on purpose: no instance is coming,
        # so requests are answered 503 at once instead of being held.
        self.holding = True
        # Replaced whole on each change, never changed in place: read-only to callers,
        # and safe to iterate while a change happens.
        self.targets: tuple[Target, ...] = ()
        # The target when the set has exactly one, else None: a request's shortcut
        # past pick() (most components have one instance, and this is per request).
        self.only: Target | None = None
        self._next = 0  # where the next pick starts looking (see pick)
        # Counters of answered requests, read by metrics.py at scrape time: the
        # hot path only adds to plain numbers.
        self.requests = 0
        self.codes = [0] * 10  # by status class: codes[2] counts the 2xx
        self.durations = [0] * (len(DURATION_BOUNDS) + 1)  # per bucket, not cumulative
        self.duration_sum = 0.0
        self.clients = 0  # client connections open on the component's address
        self.clients_evicted = 0  # idle ones closed to make room at a cap
        self.clients_refused = 0  # new ones answered 503 at a cap, none being idle
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def hold_timeout(self) -> float:
        return self.limits.hold_timeout

    @property
    def target(self) -> Target | None:
        """The first target of the set (status's `active`), or None."""
        return self.targets[0] if self.targets else None

    # -- the balancing set ---------------------------------------------------------
    def add(self, target: Target) -> None:
        """`target` joins the set (it is healthy); requests held for one go now."""
        if target not in self.targets:
            self._set((*self.targets, target))
        self._wake()

    def remove(self, target: Target) -> bool:
        """`target` leaves the set at once: no new request picks it, those in flight on it
        finish (draining it is the caller's). False if it was not in the set."""
        if target not in self.targets:
            return False
        self._set(tuple(t for t in self.targets if t is not target))
        return True

    def replace(self, old: Target, new: Target) -> None:
        """`new` takes `old`'s place in one step (added, if `old` is not in the set)."""
        if old in self.targets:
            self._set(tuple(new if t is old else t for t in self.targets if t is not new))
            self._wake()
        else:
            self.add(new)

    def swap(self, new: Target | None) -> Target | None:
        """The set becomes `new` alone (or empty), in one step; the first target it
        replaced. The one-instance rotation."""
        old = self.target
        self._set((new,) if new is not None else ())
        if new is not None:
            self._wake()
        return old

    def _set(self, targets: tuple[Target, ...]) -> None:
        self.targets = targets
        self.only = targets[0] if len(targets) == 1 else None

    def _wake(self) -> None:
        """A target joined: the requests held for one pick theirs now."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def pick(self, exclude: Target | None = None) -> Target | None:
        """The target for a request: the one with the fewest requests in flight, ties
        broken round-robin, never `exclude`; None if there is no other.

        Least outstanding requests (HAProxy's leastconn, nginx's least_conn, counted
        per request here): a slow replica holds its requests longer, so it gets fewer."""
        targets = self.targets
        n = len(targets)
        if n == 1:  # the common case, on every request: as cheap as it can be
            first = targets[0]
            return first if first is not exclude else None
        if n == 0:
            return None
        # Look from the one after the last pick: of the tied, each gets its turn.
        best: Target | None = None
        at = 0
        for i in range(self._next, self._next + n):
            t = targets[i % n]
            if t is not exclude and (best is None or t.in_flight < best.in_flight):
                best, at = t, i
        self._next = (at + 1) % n
        return best

    def answered(self, status: int, seconds: float) -> None:
        """A client got its whole answer (`status`), `seconds` after its request head arrived."""
        self.requests += 1
        self.codes[status // 100 % 10] += 1
        self.durations[bisect_left(DURATION_BOUNDS, seconds)] += 1
        self.duration_sum += seconds

    async def wait_target(self, exclude: Target | None = None) -> Target | None:
        """A target for a request (other than `exclude`, one that just failed), waiting up
        to hold_timeout for one to join; None if none came. Once one joined, `exclude`
        is taken too if it is all there is: it was added back on purpose."""
        target = self.pick(exclude)
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
            target = self.pick(exclude) or self.pick()
        return target
