"""Starting instances from a small process of the daemon's own, so that the event loop,
which carries the proxy, never waits for a process to start.

Why: starting a process blocks its parent until the child has exec'd (vfork). An
instance's child first calls setsid(), which on Linux puts it in a new scheduling
autogroup, where it waits for a CPU: on a busy machine the daemon's loop, and every
request in flight, stopped for 12-20 ms per spawn (docs/benchmarks.md). The spawner
takes that wait instead. Spawning from a thread is no way out: until it execs, the
child holds copies of every descriptor the loop opens meanwhile (a port probe's socket,
say). The spawner is a fresh interpreter (forking a process with threads is unsafe),
started once per daemon; its side is spawner_process.py.

Protocol, one JSON object per line over a socket pair:
  daemon -> spawner  {"id": n, "argv": [...], "cwd": "...", "env": {...}, "log": "path",
                     "cgroup": "path" or null}  (the child joins the cgroup before exec)
  spawner -> daemon  {"id": n, "pid": p}  or  {"id": n, "errno": e, "strerror": s,
                     "filename": f}  or  {"id": n, "error": "..."}
                     {"exited": pid, "code": c}  when a child it started exits
The spawner answers requests in order, and a child's reply always comes before its
exit. Instances are the spawner's children: it reaps them and reports their exit codes
(negative: the signal that ended it, as subprocess reports it). When the daemon's end
closes, the spawner exits and leaves the instances running, as the daemon itself would:
a successor adopts them. If the spawner dies, what it started runs on, orphaned: their
waits raise SpawnerGone (instance.py then polls, as for an adopted instance) and the
next spawn starts a new spawner.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

# How long the spawner may take to exit once its daemon's end is closed.
CLOSE_TIMEOUT = 5.0
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from rotator.spawner_process import serve; serve(*map(int, sys.argv[2:]))"
)
_ROOT = str(Path(__file__).resolve().parents[1])


class SpawnerGone(Exception):
    """The spawner exited: a spawn in flight failed, and exit codes are no longer known."""


class SpawnedChild:
    """An instance's process as the daemon sees it: a pid, and an exit code to come."""

    def __init__(self, pid: int, exit: asyncio.Future[int]) -> None:
        self.pid = pid
        self._exit = exit

    @property
    def returncode(self) -> int | None:
        if self._exit.done() and self._exit.exception() is None:
            return self._exit.result()
        return None

    async def wait(self) -> int:
        """The exit code; raises SpawnerGone if the spawner died before the child."""
        return await asyncio.shield(self._exit)


class Spawner:
    """The daemon's side: start the spawner, ask it for processes, learn their exits."""

    def __init__(self, fd_limit: int | None = None) -> None:
        # The soft descriptor limit for what it starts (None: its own, the daemon's).
        self.fd_limit = fd_limit
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[SpawnedChild]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._starting = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        if self._proc is not None:  # one that was lost: reaped before its successor starts
            await reap(self._proc, CLOSE_TIMEOUT)
        ours, theirs = socket.socketpair()
        limit = [] if self.fd_limit is None else [str(self.fd_limit)]
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, _ROOT, str(theirs.fileno()), *limit],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
                # Its own group: a terminal's Ctrl-C goes to the daemon, which decides.
                process_group=0,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._reading = asyncio.ensure_future(self._read(reader))

    async def spawn(
        self,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        log: Path,
        cgroup: Path | None = None,
    ) -> SpawnedChild:
        """Start `argv` in a session of its own (and in `cgroup`, if given and it can),
        stdin from /dev/null, output appended to `log`. Raises OSError as subprocess
        would (FileNotFoundError: no such command)."""
        async with self._starting:
            if self._writer is None:
                await self.start()
        if self._writer is None:  # lost while starting
            raise SpawnerGone("the spawner exited")
        ident = next(self._ids)
        child = self._replies[ident] = asyncio.get_running_loop().create_future()
        request = {
            "id": ident,
            "argv": argv,
            "cwd": str(cwd),
            "env": env,
            "log": str(log),
            "cgroup": None if cgroup is None else str(cgroup),
        }
        self._writer.write(json.dumps(request).encode() + b"\n")
        return await child

    async def close(self) -> None:
        """Let the spawner go (it exits; what it started runs on) and wait until it has."""
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
        proc, self._proc = self._proc, None
        if proc is not None:
            await reap(proc, CLOSE_TIMEOUT)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if "exited" in message:
                    exit = self._exits.pop(message["exited"], None)
                    if exit is not None and not exit.done():
                        exit.set_result(message["code"])
                else:
                    self._answer(message)
        except (OSError, ValueError):
            pass  # a broken channel: the same as a spawner that exited
        finally:
            self._lost()

    def _answer(self, message: dict[str, Any]) -> None:
        """Resolve a spawn's request. Its child's exit is awaited from here on, not from
        when the spawn resumes: a quick exit's message may come in the same read."""
        reply = self._replies.pop(message["id"], None)
        if reply is None:
            return
        if reply.cancelled() and "pid" in message:
            # Nobody will own it (the daemon stopping while it starts a component, say):
            # it must not run. It has exec'd, so it leads a process group of its own.
            with contextlib.suppress(OSError):
                os.killpg(message["pid"], signal.SIGKILL)
            return
        if "pid" in message:
            exit = self._exits[message["pid"]] = reply.get_loop().create_future()
            reply.set_result(SpawnedChild(message["pid"], exit))
        elif "errno" in message:
            reply.set_exception(OSError(message["errno"], message["strerror"], message["filename"]))
        else:
            reply.set_exception(OSError(message["error"]))

    def _lost(self) -> None:
        """The channel closed: whatever waits on the spawner learns it will not answer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        pending: list[asyncio.Future[Any]] = [*self._replies.values(), *self._exits.values()]
        for waiting in pending:
            if not waiting.done():
                waiting.set_exception(SpawnerGone("the spawner exited"))
                waiting.exception()  # retrieved: nobody may be waiting for it
        self._replies.clear()
        self._exits.clear()


async def reap(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a helper process whose channel closed (the spawner, the watcher) to exit, as
    it does at once, killing it if it does not within `timeout`; never blocking the loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proc.poll() is None and loop.time() < deadline:
        await asyncio.sleep(0.01)
    if proc.returncode is None:
        proc.kill()
        proc.wait()
