"""Choosing the private port for a component's next instance.

`choose_port` is the decision: walk the pool round-robin from just after the
last port used (so a just-freed port rests longest), skip our own live
instances and ports someone else holds, prefer a port with no TIME_WAIT, and
fall back to the longest-rested port that only a SO_REUSEADDR bind accepts.
It takes the probe as a function, so it is pure and tested with a fake.

`probe_port` is the side effect (test binds), `port_holders` asks psutil who
holds ports, and `describe_exhausted` / `describe_holders` put that into words.
Starting instances, remembering `last_used` and logging are left to the caller.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil


class PortState(enum.Enum):
    FREE = "free"  # a plain bind succeeds on the host and on the wildcard address
    TIME_WAIT = "time_wait"  # only a SO_REUSEADDR bind succeeds (lingering TIME_WAIT)
    BUSY = "busy"  # even a SO_REUSEADDR bind fails: a listener / bound socket holds it


@dataclass(frozen=True)
class Choice:
    port: int
    state: PortState  # FREE, or TIME_WAIT: chosen although TIME_WAIT lingers (caller logs it)


Holders = dict[int, list[tuple[int, str]]]  # port -> [(pid, process name)]


class NoFreePort(Exception):
    """No port of the pool can be bound. The message is rebuilt from `pool` and
    `holders` each time, so a caller may fill `holders` after catching it."""

    def __init__(self, pool: Sequence[int], holders: Holders | None = None) -> None:
        self.pool: tuple[int, ...] = tuple(pool)
        self.holders: Holders = dict(holders or {})
        super().__init__(self.pool, self.holders)

    def __str__(self) -> str:
        return describe_exhausted(self.pool, self.holders)


def rotation_order(pool: Sequence[int], last_used: int | None) -> list[int]:
    """The pool in round-robin order starting just after last_used (so a just-freed
    port rests longest); if last_used is None or not in pool, start at pool[0]."""
    ports = list(pool)
    if last_used is None or last_used not in ports:
        return ports
    i = ports.index(last_used) + 1
    return ports[i:] + ports[:i]


def choose_port(
    pool: Sequence[int],
    last_used: int | None,
    in_use: Collection[int],
    probe: Callable[[int], PortState],
) -> Choice:
    """The first FREE port in rotation order, skipping `in_use` (never probed) and
    BUSY ports; else the first TIME_WAIT one (the longest-rested); else NoFreePort
    with empty holders (the caller fills them via `port_holders`)."""
    fallback: int | None = None
    for port in rotation_order(pool, last_used):
        if port in in_use:
            continue
        state = probe(port)
        if state is PortState.FREE:
            return Choice(port, state)
        if state is PortState.TIME_WAIT and fallback is None:
            fallback = port
    if fallback is not None:
        return Choice(fallback, PortState.TIME_WAIT)
    raise NoFreePort(pool, {})


def _can_bind(family: int, addr: tuple[Any, ...], *, reuse: bool) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # Windows' SO_REUSEADDR lets a bind steal a live port: only set it on POSIX.
            if reuse and os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        return True
    except OSError:  # EADDRINUSE, EADDRNOTAVAIL, EACCES, EAFNOSUPPORT, ...
        return False


def _probe_one(family: int, sockaddr: tuple[Any, ...], port: int) -> PortState:
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    targets = [sockaddr] if sockaddr[0] == wildcard else [sockaddr, (wildcard, port)]
    # One at a time: a plain bind of host and wildcard together conflicts with itself.
    if all(_can_bind(family, t, reuse=False) for t in targets):
        return PortState.FREE
    # The wildcard is checked with SO_REUSEADDR too: on macOS/BSD a SO_REUSEADDR bind
    # of 127.0.0.1:P succeeds next to a live listener on 0.0.0.0:P.
    if all(_can_bind(family, t, reuse=True) for t in targets):
        return PortState.TIME_WAIT
    return PortState.BUSY


def probe_port(host: str, port: int) -> PortState:
    """Bind-test (host, port) and close again: FREE if plain binds succeed on the host
    and on the same family's wildcard, TIME_WAIT if only SO_REUSEADDR binds do, else
    BUSY. A host resolving to several addresses (e.g. "localhost") gets the worst state
    of them; an unresolvable host is BUSY. Never sets SO_REUSEPORT."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return PortState.BUSY
    order = [PortState.FREE, PortState.TIME_WAIT, PortState.BUSY]
    states = [
        _probe_one(family, sockaddr, port)
        for family, sockaddr in dict.fromkeys((i[0], i[4]) for i in infos)
        if family in (socket.AF_INET, socket.AF_INET6)
    ]
    return max(states, key=order.index, default=PortState.BUSY)


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return "?"


def port_holders(ports: Collection[int]) -> Holders:
    """Which processes hold a TCP socket (listening, connected or bound) whose local
    port is in `ports`: port -> [(pid, name)]. Ports whose holder cannot be seen
    (another user's process without root, TIME_WAIT) are left out. Never raises."""
    wanted = set(ports)
    found: dict[int, dict[int, str]] = {}

    def note(conn: object, pid: int | None, name: str | None = None) -> None:
        laddr = getattr(conn, "laddr", None)
        port = getattr(laddr, "port", None)
        if pid and port in wanted:
            pids = found.setdefault(port, {})
            if pid not in pids:
                pids[pid] = name or _name(pid)

    try:
        try:
            for conn in psutil.net_connections(kind="tcp"):
                note(conn, conn.pid)
        except psutil.AccessDenied:  # macOS without root: ask process by process
            for proc in psutil.process_iter(["pid", "name"]):
                try:
                    conns = getattr(proc, "net_connections", None) or proc.connections
                    for pconn in conns(kind="tcp"):
                        note(pconn, proc.info["pid"], proc.info["name"])
                except (psutil.Error, OSError):  # AccessDenied, NoSuchProcess, ...
                    continue
    except Exception:  # diagnostics only: report what we have
        pass
    return {port: sorted(pids.items()) for port, pids in found.items()}


def _runs(ports: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for port in ports:
        if runs and port == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], port)
        else:
            runs.append((port, port))
    return runs


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def format_pool(pool: Sequence[int]) -> str:
    """Compact text for a pool, in its own order: [18001, ..., 18010, 18020] -> "18001-18010,18020"."""
    return ",".join(_span(a, b) for a, b in _runs(pool))


def _who(holders: list[tuple[int, str]]) -> str:
    return " and ".join(f"pid {pid} ({name})" for pid, name in holders) or "an unknown process"


def describe_holders(port: int, holders: Holders) -> str:
    """Who holds one port, for a bind error: "held by pid 4242 (python3)"."""
    return f"held by {_who(holders.get(port, []))}"


def describe_exhausted(
    pool: Sequence[int], holders: Holders, own: Mapping[int, str] | None = None
) -> str:
    """One line naming the pool and who holds each port, contiguous ports with the same
    holders merged: "no free port in pool 18001-18010 (held: 18001 by pid 4242 (python3),
    18002-18010 by an unknown process)". `own`: the ports of the component's own instances,
    port -> which ("active instance (pid 4242)"), named as such: that the pool is full of
    the component itself is the one thing its owner can fix."""
    if not pool:
        return "no free port in pool (the pool is empty)"
    own = own or {}
    parts: list[tuple[int, int, str]] = []  # (first, last, who)
    for port in pool:
        who = f"this component's {own[port]}" if port in own else _who(holders.get(port, []))
        if parts and parts[-1][2] == who and port == parts[-1][1] + 1:
            parts[-1] = (parts[-1][0], port, who)
        else:
            parts.append((port, port, who))
    held = ", ".join(f"{_span(a, b)} by {who}" for a, b, who in parts)
    if all(port in own for port in pool):
        held += "; a rotation needs a free port beside its running instances: add ports"
    return f"no free port in pool {format_pool(pool)} (held: {held})"
