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

Messages are single JSON lines. This module holds the wire format and the new
daemon's blocking side (it runs before the event loop, so the sockets exist
before anything binds); the old daemon's side is in daemon.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTOCOL = 1
MAX_MESSAGE = 64 * 1024
MAX_FDS = 1024
# Waiting for the old daemon's answer to hello: it first lets a rotation in
# progress finish (bounded by QUIESCE_TIMEOUT), then answers at once.
HELLO_TIMEOUT = 90.0
QUIESCE_TIMEOUT = 60.0


class TakeoverError(Exception):
    """The handover could not happen; the old daemon (if any) serves on. The message says why."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / "takeover.sock"


@dataclass
class Handover:
    """What the new daemon received: the old daemon's sockets, by component name,
    the admin API's socket, the admin token, and the connection to say ready on."""

    conn: socket.socket
    old_pid: int
    token: str
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    admin: socket.socket | None = None

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
