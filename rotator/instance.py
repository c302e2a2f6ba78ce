"""One OS process of a component: spawn it, know when it exits, stop its whole tree.

An instance runs in its own session (so its process group id is its pid) with
its output appended to the component's log file. Stopping signals the process
group and every descendant found through psutil (some leave the group), waits,
then kills what is left and checks that nothing survived. Deciding *when* to
start or stop is the component's job, not this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

# After SIGKILL, how long to wait for the kernel to reap what was killed.
KILL_GRACE = 3.0
POLL = 0.02


class SpawnError(Exception):
    """The command could not be started at all (not found, not executable, bad cwd)."""


@dataclass(frozen=True)
class StopResult:
    outcome: (
        str  # "graceful": exited on the stop signal; "forced": killed; "gone": was already dead
    )
    seconds: float
    survivors: tuple[int, ...] = ()  # pids still alive after everything: should never happen


class Instance:
    def __init__(
        self,
        name: str,
        port: int,
        process: asyncio.subprocess.Process,
        log_path: Path,
        log_offset: int,
    ) -> None:
        self.name = name
        self.port = port
        self.process = process
        self.pid = process.pid
        self.log_path = log_path
        self.log_offset = log_offset
        self.started = time.time()
        self.stopping = False
        try:
            self.create_time: float | None = psutil.Process(self.pid).create_time()
        except psutil.Error:
            self.create_time = None

    def __repr__(self) -> str:
        return f"{self.name}[{self.pid} :{self.port}]"

    @classmethod
    async def spawn(
        cls,
        name: str,
        port: int,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
    ) -> Instance:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(
                f"==== rotator: {name} on port {port} at {stamp}: {shlex.join(argv)}\n".encode()
            )
            log.flush()
            offset = log.tell()
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=cwd,
                    env={**os.environ, **env},
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                log.write(f"==== rotator: could not start: {exc}\n".encode())
                raise SpawnError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
        return cls(name, port, process, log_path, offset)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        return await self.process.wait()

    def tail(self, lines: int = 20) -> list[str]:
        """The last lines this instance wrote (not its predecessors')."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                data = log.read()
        except OSError:
            return []
        own = data.split(b"\n==== rotator: ", 1)[0]
        return own.decode(errors="replace").splitlines()[-lines:]

    async def stop(self, sig: signal.Signals, timeout: float) -> StopResult:
        self.stopping = True
        began = time.monotonic()
        tree = self._tree()
        if self.returncode is not None and not tree:
            return StopResult("gone", 0.0)
        self._signal(sig, tree)
        if await self._wait_gone(tree, timeout):
            return StopResult("graceful", time.monotonic() - began)
        self._signal(signal.SIGKILL, tree + self._tree())
        await self._wait_gone(tree, KILL_GRACE)
        survivors = tuple(p.pid for p in tree if _alive(p))
        return StopResult("forced", time.monotonic() - began, survivors)

    def _tree(self) -> list[psutil.Process]:
        """The root, its descendants, and whatever else is in its process group
        (children whose parent exited early are reparented away from the root)."""
        procs: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            if self.create_time is None or root.create_time() == self.create_time:
                procs[root.pid] = root
                for child in root.children(recursive=True):
                    procs[child.pid] = child
        for proc in psutil.process_iter():
            if proc.pid in procs:
                continue
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(proc.pid) == self.pid:
                    procs[proc.pid] = proc
        return [p for p in procs.values() if _alive(p)]

    def _signal(self, sig: signal.Signals, tree: list[psutil.Process]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    async def _wait_gone(self, tree: list[psutil.Process], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), timeout)
        while time.monotonic() < deadline:
            if not any(_alive(p) for p in tree):
                return True
            await asyncio.sleep(POLL)
        return not any(_alive(p) for p in tree)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
