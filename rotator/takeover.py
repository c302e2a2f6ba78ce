"""Handing a running daemon's listening sockets to its successor (`rotator up --takeover`).

The running daemon listens on state_dir/takeover.sock (a Unix socket in the 0700
state_dir, itself 0600). A new daemon connects and says hello. The old one lets
any rotation in progress finish, stops supervising, writes its state file one
last time and answers with its listening sockets: every component's and the
admin API's, as file descriptors (SCM_RIGHTS through socket.send_fds, which
Linux and macOS both have), named in the message, plus the admin token. From
then on both daemons accept on the same sockets, so a new connection waits in
the shared backlog until one of them takes it: none is refused. The new daemon
adopts the running instances from the state file and says ready; the old one
stops accepting, says bye, finishes the requests it is proxying and exits
without stopping any instance. If the new daemon goes away before it is ready,
the old one resumes supervising and serves on as before.

Messages are single JSON lines. This module holds the whole protocol: the old
daemon's side (SuccessorListener, on the event loop; it reaches the daemon only
through the Incumbent protocol, so what it may do there is listed in one place),
the new daemon's blocking side (request(); it runs before the event loop, so the
sockets exist before anything binds) and the wire format. What the sockets serve,
and the instances, stay the daemon's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

PROTOCOL = 1
MAX_MESSAGE = 64 * 1024
MAX_FDS = 1024
# Waiting for the old daemon's answer to hello: it first lets a rotation in
# progress finish (bounded by QUIESCE_TIMEOUT), then answers at once.
HELLO_TIMEOUT = 90.0
QUIESCE_TIMEOUT = 60.0
# How long a successor may take from receiving the sockets to saying ready (it adopts
# every instance, each health-checked within adoption.ADOPT_CHECK_TIMEOUT).
READY_TIMEOUT = 600.0
# A successor says hello as soon as it connects; a peer that does not is dropped.
HELLO_WAIT = 5.0


class TakeoverError(Exception):
    """The handover could not happen; the old daemon (if any) serves on. The message says why."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / "takeover.sock"


# -- the running daemon's side ----------------------------------------------------------
class Incumbent(Protocol):
    """What the running daemon offers the SuccessorListener, and all it may touch."""

    def out(self, line: str) -> None: ...

    @property
    def reloading(self) -> bool: ...

    def listening_fds(self) -> dict[str, int]:
        """Every component's listening socket, by component name."""
        ...

    def admin_fd(self) -> int: ...

    def admin_token(self) -> str: ...

    def service_notify_socket(self) -> str | None:
        """The service manager's NOTIFY_SOCKET, if the daemon has one: the successor
        tells it the new main pid."""

    async def quiesce(self) -> None:
        """Let rotations in progress end (bounded by QUIESCE_TIMEOUT), then stop supervising."""

    def save_last(self) -> None:
        """Write the state file a last time, then no more: the successor owns it."""

    def resume(self) -> None:
        """The takeover failed: supervise, and write the state file, again."""

    async def stop_accepting(self) -> None:
        """Stop accepting on the components' listening sockets and the admin API's."""

    def request_shutdown(self) -> None: ...


class SuccessorListener:
    """Owns takeover.sock: accepts one successor at a time and hands it the daemon's
    sockets; `successor` is the pid of the one that took them (then the daemon lets go)."""

    def __init__(self, daemon: Incumbent, state_dir: Path) -> None:
        self._daemon = daemon
        self._path = socket_path(state_dir)
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._successor: int | None = None

    @property
    def successor(self) -> int | None:
        return self._successor

    def start(self) -> None:
        """Listen on takeover.sock; when that fails, say so: the daemon serves on without."""
        path = self._path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(1)
        except OSError as exc:
            sock.close()
            self._daemon.out(
                f"rotator: takeover unavailable: cannot listen on {path}: {exc.strerror or exc}"
            )
            return
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.ensure_future(self._accept(sock))

    def cancel(self) -> None:
        """Accept no more successors (the daemon is going down); a handover under way ends."""
        if self._accepting is not None:
            self._accepting.cancel()

    def close(self) -> None:
        """Close and unlink takeover.sock."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                self._path.unlink()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while self._successor is None:
            conn, _ = await loop.sock_accept(sock)
            with conn:
                try:
                    await self._hand_over(conn)
                except Exception as exc:  # whatever a peer sends, the daemon serves on
                    self._daemon.out(
                        f"rotator: takeover failed ({type(exc).__name__}: {exc}); serving on"
                    )
                    self._daemon.resume()

    async def _hand_over(self, conn: socket.socket) -> None:
        daemon = self._daemon
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        hello = await asyncio.wait_for(receive_async(loop, conn), HELLO_WAIT)
        if hello.get("hello") != PROTOCOL:
            send(conn, {"error": f"unknown takeover protocol {hello.get('hello')!r}"})
            return
        if daemon.reloading:
            send(conn, {"error": "a reload is in progress; try again"})
            return
        pid = int(hello.get("pid", 0))
        daemon.out(f"rotator: pid {pid} is taking over; waiting for rotations in progress")
        await daemon.quiesce()
        daemon.save_last()
        listening = daemon.listening_fds()
        names: list[str | None] = [*listening, None]  # None: the admin API's socket
        fds = [*listening.values(), daemon.admin_fd()]
        token = daemon.admin_token()
        notify = daemon.service_notify_socket()
        send(conn, {"pid": os.getpid(), "token": token, "sockets": names, "notify": notify}, fds)
        answer = await asyncio.wait_for(receive_async(loop, conn), READY_TIMEOUT)
        if not answer.get("ready"):
            raise TakeoverError(f"unexpected answer {answer}")
        self._successor = pid
        self.close()  # before bye: the successor binds the path next
        await daemon.stop_accepting()
        send(conn, {"bye": True})
        daemon.out(f"rotator: handed over to pid {pid}; finishing the requests in flight")
        daemon.request_shutdown()


# -- the new daemon's side --------------------------------------------------------------
@dataclass
class Handover:
    """What the new daemon received: the old daemon's sockets, by component name,
    the admin API's socket, the admin token, and the connection to say ready on."""

    conn: socket.socket
    old_pid: int
    token: str
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    admin: socket.socket | None = None
    notify_socket: str | None = None  # the old daemon's service manager (sd_notify)

    def ready(self, timeout: float = 10.0) -> None:
        """Tell the old daemon to stop accepting; returns once it said bye."""
        self.conn.settimeout(timeout)
        send(self.conn, {"ready": True})
        answer, _ = receive(self.conn)
        if not answer.get("bye"):
            raise TakeoverError(f"the old daemon (pid {self.old_pid}) did not confirm: {answer}")
        self.conn.close()


def request(state_dir: Path, timeout: float = HELLO_TIMEOUT) -> Handover:
    """Ask the daemon running for `state_dir` for its sockets (blocking). TakeoverError
    when there is none, or it refuses."""
    path = socket_path(state_dir)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        raise TakeoverError(
            f"no running daemon to take over from ({path} does not answer); "
            "start one with: rotator up"
        ) from None
    except OSError as exc:
        conn.close()
        raise TakeoverError(f"cannot reach the running daemon at {path}: {exc}") from None
    try:
        send(conn, {"hello": PROTOCOL, "pid": os.getpid()})
        answer, fds = receive(conn)
    except (OSError, TakeoverError) as exc:
        conn.close()
        raise TakeoverError(f"the running daemon did not hand over: {exc}") from None
    return _handover(conn, answer, fds)


def _handover(conn: socket.socket, answer: dict[str, Any], fds: list[int]) -> Handover:
    names = answer.get("sockets")
    if "error" in answer or not isinstance(names, list) or len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        conn.close()
        raise TakeoverError(str(answer.get("error", f"unexpected answer: {answer}")))
    socks = [_listening(fd) for fd in fds]
    handover = Handover(conn, int(answer.get("pid", 0)), str(answer.get("token", "")))
    if isinstance(notify := answer.get("notify"), str) and notify:
        handover.notify_socket = notify
    for name, sock in zip(names, socks, strict=True):
        if name is None:
            handover.admin = sock
        else:
            handover.sockets[str(name)] = sock
    return handover


def _listening(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    os.set_inheritable(fd, False)  # instances must not hold our listening sockets
    return sock


# -- the wire format ---------------------------------------------------------------------
def send(conn: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(conn, [data], fds)
    else:
        conn.sendall(data)


async def receive_async(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> dict[str, Any]:
    """One message without descriptors, from a non-blocking socket on the event loop."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = await loop.sock_recv(conn, MAX_MESSAGE)
        if not chunk:
            raise TakeoverError("the other daemon closed the connection")
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise TakeoverError("message too long")
    return _parse(data)


def receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and the descriptors that came with it (blocking, with the
    socket's timeout). TakeoverError on a close or a malformed message."""
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, more, _, _ = socket.recv_fds(conn, MAX_MESSAGE, MAX_FDS)
        fds.extend(more)
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise TakeoverError("the other daemon closed the connection")
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise TakeoverError("message too long")
    return _parse(data), fds


def _parse(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise TakeoverError(f"not a takeover message: {data[:80]!r}")
    return message
