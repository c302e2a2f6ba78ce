"""systemd's sd_notify protocol, both ways: the socket rotator gives its instances, and
the messages the daemon sends its own service manager.

A message is one datagram of newline-separated VAR=VALUE assignments (READY=1,
STATUS=..., WATCHDOG=1, ...); lines that are not an assignment, and variables we do not
know, are ignored, as systemd ignores them. `parse` is the pure part.

Instances: one Unix datagram socket per daemon (`state_dir/notify.sock`, 0600 in the
0700 state_dir: only our user can send to it), passed to every instance as
NOTIFY_SOCKET, so an app that already calls sd_notify works unchanged. What an instance
says counts only when it comes from its own tree: on Linux SO_PASSCRED makes the kernel
attach the sender's pid, uid and gid to each datagram (SCM_CREDENTIALS, which the sender
cannot forge), and the sender counts for the instance whose pid is the sender or one of
its ancestors (psutil), or, for a process that left the tree (a daemonized worker
reparented to init), whose marker is in its environment. A datagram from another uid,
or from a process of no instance's tree, is dropped. macOS has no SO_PASSCRED and a
datagram socket has no peer for LOCAL_PEERCRED: there the only check is the socket's
0700 directory (only our user can send), and a message names its instance only by
MAINPID= (which anyone of that user could write); without it, READY=1 counts for every
instance waiting for readiness (each still confirmed by its own health probe), and
STATUS= and WATCHDOG=1 for no one. So on macOS READY=1 from outside an instance's tree
cannot be told apart.

What an instance said is kept in its Channel: a future resolved by READY=1, its last
STATUS=, an event set by each WATCHDOG=1. The component decides what they mean.

The daemon itself: `ServiceManager` sends to the NOTIFY_SOCKET the daemon was started
with (READY=1, RELOADING=1 with MONOTONIC_USEC, STOPPING=1, STATUS=, MAINPID=); it does
nothing when there is none, and a send that fails is reported once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

# systemd reads at most this much of one notification (NOTIFY_BUFFER_MAX, PIPE_BUF).
MAX_DATAGRAM = 4096
# Messages from senders of no watched instance, kept for a watch() that comes just
# after: a fast app may say READY=1 before its spawn has returned to the component.
EARLY = 64
EARLY_AGE = 10.0
STATUS_MAX = 200  # characters of STATUS= kept (status output is one line)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
CREDENTIALS = hasattr(socket, "SO_PASSCRED")  # Linux


def parse(data: bytes) -> dict[str, str]:
    """The assignments of one datagram, by variable; a later one wins, as in systemd."""
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", errors="replace").split("\n"):
        name, eq, value = line.partition("=")
        if eq and name and name.isascii() and name.replace("_", "").isalnum():
            fields[name] = value
    return fields


@dataclass(frozen=True)
class Message:
    """One datagram: its assignments and, where the kernel says (Linux), its sender."""

    fields: dict[str, str]
    pid: int | None = None
    uid: int | None = None
    at: float = 0.0


class Channel:
    """What one instance said: `ready` resolves at its READY=1, `status` is its last
    STATUS=, `alive` is set at each WATCHDOG=1 (the watcher clears it)."""

    def __init__(self, pid: int, marker: str) -> None:
        self.pid = pid
        self.marker = marker
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status: str | None = None
        self.alive = asyncio.Event()

    def hear(self, fields: dict[str, str]) -> None:
        if "STATUS" in fields:
            self.status = " ".join(fields["STATUS"].split())[:STATUS_MAX] or None
        if fields.get("READY") == "1" and not self.ready.done():
            self.ready.set_result(None)
        if fields.get("WATCHDOG") == "1":
            self.alive.set()


class NotifySocket:
    """The instances' NOTIFY_SOCKET: bound by open(), read on the event loop, each
    message handed to the Channel of the instance whose tree sent it."""

    def __init__(self, path: Path, marker_var: str, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self._marker_var = marker_var  # the environment variable that carries a marker
        self._clock = clock
        self._sock: socket.socket | None = None
        self._inode = 0
        self.unusable = False  # open() failed: every instance counts as READY=1 at once
        self._channels: dict[int, Channel] = {}  # by instance pid
        self._early: collections.deque[Message] = collections.deque(maxlen=EARLY)

    def open(self) -> None:
        """Bind the socket (OSError when it cannot be) and read it on the running loop."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            if CREDENTIALS:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.setblocking(False)
        except OSError:
            sock.close()
            self.unusable = True
            raise
        self._sock = sock
        self._inode = os.stat(self.path).st_ino
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        with contextlib.suppress(OSError):
            # A successor (takeover) may have bound its own socket at the path since.
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    def watch(self, pid: int, marker: str) -> Channel:
        """The Channel of the instance `pid` (its marker: `marker`); what its tree said
        just before is in it already."""
        channel = self._channels.get(pid)
        if channel is None or channel.marker != marker:
            channel = self._channels[pid] = Channel(pid, marker)
        if self.unusable and not channel.ready.done():  # as `ready: poll`: the probe decides
            channel.ready.set_result(None)
        horizon = self._clock() - EARLY_AGE
        for message in [m for m in self._early if m.at >= horizon]:
            if self._owner(message) is channel:
                self._early.remove(message)
                channel.hear(message.fields)
        return channel

    def forget(self, pid: int) -> None:
        self._channels.pop(pid, None)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size) if CREDENTIALS else 0
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # nothing a sender does may stop the daemon
            self.deliver(_message(data, ancillary, self._clock()))

    def deliver(self, message: Message) -> None:
        if message.uid is not None and message.uid != os.geteuid():
            return
        fields = message.fields
        if message.pid is None and fields.get("READY") == "1" and "MAINPID" not in fields:
            for each in self._channels.values():  # macOS: no sender to tell them apart
                each.hear({"READY": "1"})
            return
        if (channel := self._owner(message)) is not None:
            channel.hear(message.fields)
        elif message.pid is not None:
            self._early.append(message)

    def _owner(self, message: Message) -> Channel | None:
        """The Channel of the instance whose tree sent `message`, if any."""
        if message.pid is None:
            claimed = message.fields.get("MAINPID", "")
            return self._channels.get(int(claimed)) if claimed.isdigit() else None
        if (channel := self._channels.get(message.pid)) is not None:
            return channel
        try:
            proc = psutil.Process(message.pid)
            for parent in proc.parents():
                if (channel := self._channels.get(parent.pid)) is not None:
                    return channel
            marker = proc.environ().get(self._marker_var)
        except psutil.Error:
            return None  # gone already, or not ours to inspect
        return next((c for c in self._channels.values() if marker and c.marker == marker), None)


def _message(data: bytes, ancillary: list[tuple[int, int, bytes]], at: float) -> Message:
    pid = uid = None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == getattr(socket, "SCM_CREDENTIALS", -1):
            pid, uid, _ = _UCRED.unpack(payload[: _UCRED.size])
    return Message(parse(data), pid, uid, at)


class ServiceManager:
    """sd_notify to the service manager that started the daemon (`address`: its
    NOTIFY_SOCKET; '@' starts an abstract address); nothing without one."""

    def __init__(self, address: str | None, report: Callable[[str], None]) -> None:
        self.address = address or None
        self._report = report
        self._failed = False

    def send(self, **fields: str | int) -> None:
        """One datagram of these assignments, e.g. send(READY=1, STATUS="...")."""
        if self.address is None:
            return
        data = "".join(f"{k}={_one_line(str(v))}\n" for k, v in fields.items()).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(data, target)
        except OSError as exc:
            if not self._failed:  # once: a gone manager would say so at every event
                self._failed = True
                self._report(
                    f"rotator: warning: cannot notify the service manager at "
                    f"{self.address}: {exc.strerror or exc}"
                )
            return
        self._failed = False

    def reloading(self) -> None:
        """RELOADING=1, with the CLOCK_MONOTONIC time systemd (Type=notify-reload) wants."""
        self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)


def _one_line(value: str) -> str:
    return " ".join(value.split()) if "\n" in value else value
