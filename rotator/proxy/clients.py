"""How many client connections the proxy keeps open at once, and which it lets go at a cap.

Every descriptor of the daemon comes out of one table, RLIMIT_NOFILE: client connections,
connections to instances, health checks, the admin API and its clients, files, the
spawner's channel. Uncapped, ~1,000 idle client connections filled a table of 1024 and left
every public address and the admin API unreachable until keepalive_timeout closed them.
So client connections are capped below the limit (`max_clients`: a total over every
component, and optionally each component's own), leaving a reserve for the rest.

At a cap a new connection is made room for as nginx does when its worker_connections run
out: the connections idle longest (waiting for a request, nothing left to send) are
closed, a batch at a time; when none is idle, the new connection is answered 503 at once
and closed. The Listener (protocol.py) asks; this module keeps the count and decides.

Pure apart from closing connections: no sockets are opened here, no limit is read.
"""

from __future__ import annotations

import heapq
import resource
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from rotator.printer import duration

if TYPE_CHECKING:
    from rotator.proxy.protocol import ClientConnection, Listener

# The descriptors kept out of the client budget for everything else: idle connections in
# the instance pools (up to 64 per instance), health checks, the admin API and its clients
# (a `logs -f`, a dashboard), log and state files, the spawner. A quarter of the limit, at
# least this many; the rest, halved, is the total cap, because each client connection may
# hold a connection to an instance as well (a request in flight, a websocket).
RESERVE_MIN = 128
RESERVE_SHARE = 4  # 1/4 of the limit
# Whatever the limit, this many clients at least (a limit this low barely runs the daemon).
MIN_TOTAL = 16
# A limit of RLIM_INFINITY counts as this many descriptors (and raise_fd_limit, on macOS,
# tries this first when the hard limit is infinite).
UNLIMITED = 1 << 20
MAX_BACKLOG = 1024
# Closed at a cap to make room, as nginx does: an eighth of the connections there, at least
# one and at most this many (if that many are idle). The next arrivals then find room.
EVICT_BATCH = 32
# The daemon says it is at a cap at most this often (the metrics count every time).
REPORT_INTERVAL = 10.0


def _reserve(fd_limit: int) -> tuple[int, int]:
    if fd_limit == resource.RLIM_INFINITY or fd_limit < 0:
        fd_limit = UNLIMITED
    return fd_limit, max(RESERVE_MIN, fd_limit // RESERVE_SHARE)


def total_cap(fd_limit: int) -> int:
    """The `auto` total of client connections for a soft RLIMIT_NOFILE of `fd_limit`:
    1024 -> 384, 65536 -> 24576."""
    fd_limit, reserve = _reserve(fd_limit)
    return max(MIN_TOTAL, (fd_limit - reserve) // 2)


def accept_backlog(fd_limit: int) -> int:
    """The listen backlog of a public address: 1024, or half the reserve when that is less
    (256 -> 128 for a limit of 1024). Plain asyncio accepts up to a backlog's worth of
    connections at one wake-up before the cap sees any of them: an idle flood queued
    there took every descriptor left (EMFILE) before the oldest could be closed."""
    return max(MIN_TOTAL, min(MAX_BACKLOG, _reserve(fd_limit)[1] // 2))


def effective_total(configured: int | None, fd_limit: int) -> tuple[int, str | None]:
    """The total cap to apply for the top-level `max_clients` (None: auto), and a warning
    when the configured one is more than the descriptor limit allows: it is lowered to
    what `auto` gives, since past it the daemon would run out of descriptors."""
    most = total_cap(fd_limit)
    if configured is None or configured <= most:
        return configured or most, None
    return most, (
        f"max_clients {configured} lowered to {most}: the descriptor limit (ulimit -n) is "
        f"{fd_limit}; raise its hard limit (ulimit -Hn, systemd's LimitNOFILE=) for more"
    )


def idle(conn: ClientConnection) -> bool:
    """No request in progress and nothing left to send: closing it loses nothing. A head
    still arriving counts as idle, as for keepalive_timeout (a trickle must not hold a
    slot); one already closing does not (it is going anyway)."""
    transport = conn.transport
    return (
        not conn.queue
        and transport is not None
        and not transport.is_closing()
        and not transport.get_write_buffer_size()
    )


def longest_idle(listener: Listener, count: int) -> list[tuple[float, int, ClientConnection]]:
    """Up to `count` of the listener's idle connections, idle longest first, each as
    (idle since, number, connection). Its dict holds them in the order they went idle
    (accepted, or their last request done: Listener.idled), so the search stops there
    instead of visiting every connection: at 24,576 connections a full scan took 22 ms."""
    found = []
    for conn, number in listener.connections.items():
        if idle(conn):
            found.append((conn.idle_since, number, conn))
            if len(found) == count:
                break
    return found


class Clients:
    """The client connections of all of a daemon's listeners, against the total cap.

    Each Listener registers here and counts its connections in and out (`open`); at a
    cap it asks `make_room`. `cap` may change at a reload; 0 means no total cap.
    """

    def __init__(
        self,
        cap: int = 0,
        report: Callable[[str], None] | None = None,
        backlog: int = MAX_BACKLOG,
    ) -> None:
        self.cap = cap
        self.backlog = backlog  # of each listening socket (see accept_backlog)
        self.open = 0
        self.numbered = 0  # the last number given out (see `number`)
        self.listeners: set[Listener] = set()
        self._report = report
        self._reported = -REPORT_INTERVAL
        self._evicted = 0
        self._refused = 0

    @property
    def full(self) -> bool:
        return bool(self.cap) and self.open >= self.cap

    def make_room(self, listeners: Iterable[Listener], scope: str) -> bool:
        """Close the connections of `listeners` idle longest (a batch); False if none is
        idle. `scope` names the cap in the daemon's report."""
        listeners = list(listeners)
        count = max(1, min(EVICT_BATCH, sum(len(ls.connections) for ls in listeners) // 8))
        found = [entry for ls in listeners for entry in longest_idle(ls, count)]
        if not found:
            self._refused += 1
            self._note(scope)
            return False
        chosen = heapq.nsmallest(count, found)
        for _, _, conn in chosen:
            conn.listener.evict(conn)
        self._evicted += len(chosen)
        self._note(scope)
        return True

    def number(self) -> int:
        """The next number in the order connections were accepted or last went idle."""
        self.numbered += 1
        return self.numbered

    def _note(self, scope: str) -> None:
        now = time.monotonic()
        if self._report is None or now - self._reported < REPORT_INTERVAL:
            return
        self._reported = now
        self._report(
            f"rotator: {scope} reached: {self._evicted} idle client connection(s) closed to "
            f"make room, {self._refused} refused since the last such line (one every "
            f"{duration(REPORT_INTERVAL)} at most)"
        )
        self._evicted = self._refused = 0
