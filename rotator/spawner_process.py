"""The spawner process: spawner.py's other side (the protocol is described there).

It imports only what it needs of the standard library, so that it stays small: 12.5 MiB
of RSS measured, where importing asyncio alone would add 8.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
from typing import Any


def serve(fd: int, fd_limit: int | None = None) -> None:
    """The spawner's loop on its end of the channel, `fd`: start what the daemon asks,
    report what exits; return when the daemon's end closes, leaving what runs running.
    With `fd_limit`, what it starts inherits that soft descriptor limit."""
    if fd_limit is not None:
        # The daemon raised its own; an instance gets the limit rotator was started with,
        # as systemd does for its services: a program on select() breaks above 1024.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, hard))
    channel = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so it wakes us
    children: dict[int, subprocess.Popen[bytes]] = {}
    selector = selectors.DefaultSelector()
    selector.register(channel, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    pending = b""
    while True:
        for key, _ in selector.select():
            if key.fileobj is not channel:
                os.read(wake_r, 4096)
                continue
            try:
                data = channel.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                _send(channel, _start(json.loads(line), children))
        for pid, proc in list(children.items()):
            if proc.poll() is not None:
                del children[pid]
                _send(channel, {"exited": pid, "code": proc.returncode})


def _start(request: dict[str, Any], children: dict[int, subprocess.Popen[bytes]]) -> dict[str, Any]:
    ident = request["id"]
    cgroup = request.get("cgroup")
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            proc = subprocess.Popen(
                request["argv"],
                cwd=request["cwd"],
                env=request["env"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Before exec, so that nothing the instance forks is ever outside it.
                # This process has no threads: running code between fork and exec is safe.
                preexec_fn=(lambda: _join(cgroup)) if cgroup else None,
            )
        finally:
            os.close(log)
    except OSError as exc:
        return {"id": ident, "errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
    except Exception as exc:  # a request subprocess refuses (a NUL in argv, say): answer it
        return {"id": ident, "error": f"{type(exc).__name__}: {exc}"}
    children[proc.pid] = proc
    return {"id": ident, "pid": proc.pid}


def _join(cgroup: str) -> None:
    """Move the calling process into `cgroup`; where that fails, it runs without one."""
    try:
        fd = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError:
        pass


def _send(channel: socket.socket, message: dict[str, Any]) -> None:
    try:
        channel.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        sys.exit(0)  # the daemon is gone; what runs runs on
