"""Choosing the private port (or Unix socket path) for a component's next instance.

`choose_port` is the decision: walk the pool round-robin from just after the
last port used (so a just-freed port rests longest), skip our own live
instances and ports someone else holds, prefer a port with no TIME_WAIT, and
fall back to the longest-rested port that only a SO_REUSEADDR bind accepts.
It takes the probe as a function, so it is pure and tested with a fake.

`probe_port` is the side effect (test binds), `port_holders` asks psutil who
holds ports, and `describe_exhausted` / `describe_holders` put that into words.
Before traffic is switched to an instance, `listens_alone` tells quickly whether
it alone listens on its port; if not, `port_listeners` asks psutil who does, and
`describe_squatters` decides whether that is the instance alone and says why not.
`choose_socket` and `probe_socket` are the same for a `transport: unix` component's
pool of socket paths: round-robin, our own live paths skipped, a path someone listens
on skipped, a stale socket file (nobody listens) reported so the caller removes it.
Starting instances, remembering `last_used` and logging are left to the caller.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
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
# A process listening on a port: (pid, name); pid None when its owner cannot be seen.
Listener = tuple[int | None, str]


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


class SocketState(enum.Enum):
    FREE = "free"  # nothing at the path
    STALE = "stale"  # a socket file nobody listens on: removed before the path is used
    BUSY = "busy"  # someone listens there, or it is not a socket file: left alone


SocketProbe = Callable[[str], SocketState]


class NoFreeSocket(Exception):
    def __init__(self, pool: Sequence[str]) -> None:
        super().__init__(
            f"no free socket in the pool {', '.join(pool)}: each is used by an instance "
            "or held by another listener"
        )


def choose_socket(
    pool: Sequence[str], last_used: str | None, in_use: Collection[str], probe: SocketProbe
) -> tuple[str, SocketState]:
    """The first path in round-robin order after `last_used` (as for ports) that is not
    `in_use` (never probed) and not BUSY, with its state (FREE or STALE); else NoFreeSocket."""
    last = pool.index(last_used) if last_used in pool else None
    for i in rotation_order(range(len(pool)), last):
        path = pool[i]
        if path in in_use:
            continue
        state = probe(path)
        if state is not SocketState.BUSY:
            return path, state
    raise NoFreeSocket(pool)


def probe_socket(path: str) -> SocketState:
    """Is anyone listening on the Unix socket `path`? Connects (never blocking) to find out."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return SocketState.FREE
    except OSError:
        return SocketState.BUSY
    if not stat.S_ISSOCK(mode):
        return SocketState.BUSY
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(path)
        except FileNotFoundError:
            return SocketState.FREE
        except OSError as exc:
            # Refused: a file without a listener. EAGAIN: a listener with a full backlog.
            return SocketState.STALE if exc.errno == errno.ECONNREFUSED else SocketState.BUSY
    return SocketState.BUSY


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


def listens_alone(port: int, pids: Collection[int]) -> bool:
    """Whether the processes `pids`, and no others, listen on TCP `port`, as far as a
    quick look tells: on Linux, the kernel's listening sockets (sock_diag, as `ss -lt`
    asks) against the sockets among those processes' descriptors. False where no quick
    look is possible (macOS) or it finds anything else: ask port_listeners then.

    Why not psutil: it reads /proc/net/tcp, a line per socket of the machine, TIME_WAIT
    included, and parses every line in Python (holding the GIL, that is, the event
    loop). On a busy test machine net_connections took 1.1 s with 39,000 sockets, and
    reading the file alone 1.3-2 s with 68,000; sock_diag walks the listening sockets
    only: 0.07 ms there."""
    listening = _listening_inodes(port)
    if not listening:
        return False
    return listening <= _socket_inodes(pids)


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_DUMP_REQUEST = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_DIAG_TIMEOUT = 1.0


def _listening_inodes(port: int) -> set[int] | None:
    """The inodes of the TCP sockets listening on `port` (Linux); None where the
    kernel cannot be asked."""
    if not sys.platform.startswith("linux"):
        return None
    inodes: set[int] = set()
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(_DIAG_TIMEOUT)  # the kernel answers at once; never wait for long
            for family in (socket.AF_INET, socket.AF_INET6):
                # nlmsghdr, then inet_diag_req_v2: family, protocol, ext, pad, states, and
                # a zeroed inet_diag_sockid (48 bytes: a dump ignores it).
                request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN)
                header = struct.pack(
                    "=IHHII",
                    16 + len(request) + 48,
                    _SOCK_DIAG_BY_FAMILY,
                    _NLM_F_DUMP_REQUEST,
                    family,
                    0,
                )
                nl.send(header + request + bytes(48))
                inodes |= _dumped_inodes(nl, port)
    except OSError:
        return None
    return inodes


def _dumped_inodes(nl: socket.socket, port: int) -> set[int]:
    """Read one sock_diag dump to its end: the inodes of the sockets whose local port
    is `port`. An error answer (no IPv6, say) ends it with nothing more."""
    inodes: set[int] = set()
    while True:
        data = nl.recv(1 << 16)
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if kind in (_NLMSG_DONE, _NLMSG_ERROR) or length < 16:
                return inodes
            # inet_diag_msg: family, state, timer, retrans, then the sockid (source port
            # first, big-endian), ..., uid at 64, inode at 68.
            (sport,) = struct.unpack_from("!H", data, offset + 16 + 4)
            (inode,) = struct.unpack_from("=I", data, offset + 16 + 68)
            if sport == port:
                inodes.add(inode)
            offset += (length + 3) & ~3


def _socket_inodes(pids: Iterable[int]) -> set[int]:
    """The inodes of the sockets open in the processes `pids` (Linux)."""
    return set(_sockets_by_pid(pids))


def _sockets_by_pid(pids: Iterable[int]) -> dict[int, list[int]]:
    """inode -> the pids of `pids` that hold that socket open (Linux): processes we
    may not look into (another user's, without root) hold nothing here."""
    found: dict[int, list[int]] = {}
    for pid in pids:
        fds = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):  # exited, or not ours to look into
            for fd in os.listdir(fds):
                with contextlib.suppress(OSError, ValueError):
                    link = os.readlink(f"{fds}/{fd}")
                    if link.startswith("socket:["):
                        holders = found.setdefault(int(link[8:-1]), [])
                        if pid not in holders:
                            holders.append(pid)
    return found


def port_listeners(port: int, tree: Iterable[psutil.Process]) -> list[Listener]:
    """Who listens on TCP `port`: (pid, name) per process, once each; pid None for a
    socket whose owner this user cannot see (another user's, on Linux). Where only root
    may list every socket (macOS), only the processes of `tree` are asked, so a listener
    outside it goes unseen. Raises psutil.Error or OSError when nothing can be asked.
    On Linux the listening sockets come from sock_diag, their owners from every
    process's descriptors (see listens_alone for why not psutil)."""
    listening = _listening_inodes(port)
    if listening is not None:
        owners = _sockets_by_pid(psutil.pids())
        seen: list[int | None] = []
        for inode in listening:
            seen += owners.get(inode) or [None]  # None: nobody we may look into
        return [(pid, "?" if pid is None else _name(pid)) for pid in dict.fromkeys(seen)]
    found: list[tuple[Any, int | None]] = []
    try:
        found = [(conn, conn.pid) for conn in psutil.net_connections(kind="tcp")]
    except psutil.AccessDenied:
        for proc in tree:
            conns = getattr(proc, "net_connections", None) or proc.connections
            with contextlib.suppress(psutil.NoSuchProcess):  # exited since: holds nothing
                found += [(conn, proc.pid) for conn in conns(kind="tcp")]
    pids = {
        pid: None
        for conn, pid in found
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
    }
    return [(pid, "?" if pid is None else _name(pid)) for pid in pids]


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


def describe_squatters(
    port: int, pid: int, tree: Collection[int], listeners: Sequence[Listener]
) -> str | None:
    """None when processes of the instance `pid` (`tree`: its pids) listen on `port` and
    no other process does; else who holds the port instead of it, or besides it
    (SO_REUSEPORT shares a port among the listeners of one user)."""
    ours = [who for who in listeners if who[0] in tree]
    others = [who for who in listeners if who[0] not in tree]
    if not others:
        return None if ours else f"no process of the instance pid {pid} listens on port {port}"
    seen = [(p, name) for p, name in others if p is not None]
    strangers = " and ".join(
        ([_who(seen)] if seen else []) + ["a process of another user"] * (len(seen) < len(others))
    )
    if ours:
        return f"port {port} is also held by {strangers}, besides the instance pid {pid}"
    return f"port {port} is held by {strangers}, not by the instance pid {pid}"


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
