"""One OS process of a component: spawn or adopt it, know when it exits, stop its whole tree.

An instance is started by the daemon's spawner process (spawner.py). It runs in
its own session (so its process group id is its pid) with its output going
straight to a log file of its own (see logs.py), and carries a marker in its
environment (ROTATOR_INSTANCE) that its descendants inherit.
Stopping signals the process group, every descendant found through psutil, and
every process still carrying the marker (a double fork leaves both the group
and the tree), and, on Linux where rotator can make one, every process in the
instance's cgroup (see cgroups.py): each once. It waits, kills what is left and
checks that nothing survived.
It can also tell whether the socket listening on its port is its own (`port_problem`),
and how much memory its tree holds (`rss`, for rotator.limits).
Identity is pid *and* create time: a bare pid may have been reused; adopting one
also needs it to run as our user and carry its marker. Deciding
*when* to start or stop is the component's job, not this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shlex
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from rotator import cgroups, logs, ports
from rotator.config import Endpoint
from rotator.printer import os_error
from rotator.spawner import SpawnedChild, Spawner, SpawnerGone

MARKER = "ROTATOR_INSTANCE"
# After SIGKILL, how long to wait for the kernel to reap what was killed.
KILL_GRACE = 3.0
POLL = 0.02
# How often an adopted instance (not our child: no exit notification) is checked.
ADOPTED_POLL = 0.25
# How often a port nobody listens on yet is looked at again (see port_problem).
PORT_POLL = 0.05
# psutil's create_time is a float derived from boot time and clock ticks.
CREATE_TIME_SLACK = 0.05


class NotOurs(Exception):
    """A recorded process that is not the instance the record says: another user's, or one
    without the instance's marker. The message says which; it is not ours to stop."""


class SpawnError(Exception):
    """The command could not be started at all (not found, not executable, bad cwd)."""


@dataclass(frozen=True)
class StopResult:
    outcome: (
        str  # "graceful": exited on the stop signal; "forced": killed; "gone": was already dead
    )
    seconds: float
    survivors: tuple[int, ...] = ()  # pids still alive after everything: should never happen


def new_marker(scope: str, name: str) -> str:
    """A marker unique to one instance; `scope` ties it to one state_dir."""
    return f"{scope}:{name}:{uuid.uuid4().hex[:12]}"


class Instance:
    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        pid: int,
        marker: str,
        log_path: Path | None,
        log_offset: int,
        process: SpawnedChild | None = None,
        create_time: float | None = None,
        started: float | None = None,
        cgroup: Path | None = None,
        replica: int = 0,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.replica = replica  # the slot it fills among the component's replicas
        self.pid = pid
        self.marker = marker
        self.process = process  # None when adopted from an earlier daemon
        self.log_path = log_path  # this instance's own file; None when it could not be found
        self.log_offset = log_offset  # where its own output begins, after the header
        self.started = time.time() if started is None else started
        self.stopping = False
        # As of rotator.limits' last check (None: not measured, no such limit).
        self.rss_bytes: int | None = None  # the resident memory of its whole tree
        self.restart_at: float | None = None  # when restart_every replaces it (time.time())
        self._exit_code: int | None = None
        if create_time is None:
            try:
                create_time = psutil.Process(pid).create_time()
            except psutil.Error:
                create_time = 0.0
        self.create_time = create_time
        # Ours from the spawn; one an earlier daemon made is found again by the pid.
        self.cgroup = cgroup if process is not None else cgroups.of_process(pid)

    def __repr__(self) -> str:
        return f"{self.name}[{self.pid} {self.endpoint.short}]"

    @property
    def port(self) -> int:
        """Its port; 0 for an instance on a Unix socket."""
        return self.endpoint.port

    @classmethod
    async def spawn(
        cls,
        name: str,
        endpoint: Endpoint,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        log_dir: Path,
        marker: str = "",
        *,
        spawner: Spawner,
        cgroup_parent: Path | None = None,
        replica: int = 0,
    ) -> Instance:
        """Start the command through `spawner`, its output going to a file of its own in
        `log_dir`, in a cgroup of its own under `cgroup_parent` if given."""
        marker = marker or new_marker("-", name)
        starting = logs.starting_path(log_dir)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        header = f"==== rotator: {name} on {endpoint} at {stamp}: {shlex.join(argv)}\n".encode()
        offset = _create_log(log_dir, starting, header)
        cgroup = cgroups.make(cgroup_parent, marker) if cgroup_parent is not None else None
        try:
            process = await spawner.spawn(
                argv, cwd, {**os.environ, **env, MARKER: marker}, starting, cgroup
            )
        except FileNotFoundError as exc:
            _discard(starting, cgroup)
            if exc.filename == str(cwd):  # removed since the config was read, say
                raise SpawnError(f"working directory not found: {cwd}") from exc
            raise SpawnError(f"command not found: {argv[0]}") from exc
        except OSError as exc:
            _discard(starting, cgroup)
            raise SpawnError(f"cannot start {argv[0]!r}: {os_error(exc)}") from exc
        except SpawnerGone as exc:
            _discard(starting, cgroup)
            raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from exc
        log_path = logs.named_for(starting, process.pid)
        try:
            # The child keeps writing through its descriptor, whatever the name.
            os.rename(starting, log_path)
        except OSError:
            log_path = starting
        return cls(
            name,
            endpoint,
            process.pid,
            marker,
            log_path,
            offset,
            process=process,
            cgroup=cgroup,
            replica=replica,
        )

    @classmethod
    def adopt(
        cls,
        name: str,
        endpoint: Endpoint,
        pid: int,
        create_time: float,
        marker: str,
        started: float,
        log_dir: Path,
        replica: int = 0,
    ) -> Instance | None:
        """The instance an earlier daemon started, if that very process still runs (None if
        it is gone); its log file is found by pid (the instance is adopted all the same if
        that is gone). NotOurs when the process runs as another user or lacks the marker:
        the state file is only a claim, the process itself must prove it is ours."""
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - create_time) > CREATE_TIME_SLACK or not _alive(proc):
                return None
            if (uid := proc.uids().real) != os.getuid():
                raise NotOurs(f"it runs as uid {uid}, not as rotator's user (uid {os.getuid()})")
            if proc.environ().get(MARKER) != marker:
                raise NotOurs(f"its environment does not carry the {MARKER} marker recorded for it")
        except psutil.AccessDenied:
            raise NotOurs("it may not be inspected, so it cannot show its marker") from None
        except psutil.Error:
            return None
        log_path = logs.find(log_dir, pid)
        offset = logs.header_end(log_path) if log_path is not None else 0
        return cls(
            name,
            endpoint,
            pid,
            marker,
            log_path,
            offset,
            create_time=create_time,
            started=started,
            replica=replica,
        )

    @property
    def adopted(self) -> bool:
        return self.process is None

    @property
    def returncode(self) -> int | None:
        if self.process is not None and self.process.returncode is not None:
            return self.process.returncode
        return self._exit_code

    async def wait(self) -> int:
        """The exit code; -1 for an adopted instance, or one whose spawner died: its parent
        is then not ours, and its code unknowable."""
        if self.process is not None:
            with contextlib.suppress(SpawnerGone):
                return await self.process.wait()
        while self._exit_code is None:
            if not self._root_alive():
                self._exit_code = -1
                break
            await asyncio.sleep(ADOPTED_POLL)
        return self._exit_code

    def _root_alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.create_time) <= CREATE_TIME_SLACK and _alive(proc)
        except psutil.Error:
            return False

    async def port_problem(self, wait: float = 0.0) -> str | None:
        """None when this instance's tree, and nobody else, listens on its port; else who
        does instead or as well. Anyone can read a command line and bind its port before
        a slow-starting app does, then answer the health check: traffic must not follow.
        A port nobody listens on yet is asked about again, for up to `wait` seconds while
        the instance runs: a check that does not touch the port (exec) may pass before
        the app has bound it. Off the event loop: it scans processes and sockets (~1 ms
        on Linux, once per start)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            problem, unbound = await loop.run_in_executor(None, self._port_problem)
            if problem is None or not unbound or self.returncode is not None:
                return problem
            if loop.time() >= deadline or not self._root_alive():
                return problem
            await asyncio.sleep(PORT_POLL)

    def _port_problem(self) -> tuple[str | None, bool]:
        """What is wrong with the port's listeners, and whether it is that there are none."""
        tree = self._tree()
        pids = {p.pid for p in tree}
        if ports.listens_alone(self.port, pids):
            return None, False
        try:
            listening = ports.port_listeners(self.port, tree)
        except (psutil.Error, OSError) as exc:
            return f"cannot tell who listens on port {self.port}: {exc}", False
        return ports.describe_squatters(self.port, self.pid, pids, listening), not listening

    def rss(self) -> int:
        """The resident memory of its whole tree, in bytes: what `ps` shows for each of its
        processes, summed (so pages they share count once per process). It scans the
        processes as stop() does: 1.0 ms (median) for a tree of 10 among 100 processes on
        Linux, 1.2 ms among 500, tens of ms at times under load: call it off the event loop."""
        total = 0
        for proc in self._tree():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def tail(self, lines: int = 20) -> list[str]:
        """The last lines this instance wrote, after rotator's header."""
        if self.log_path is None:
            return []
        # A rotated file (logs.rotate) starts with the instance's output, not the header.
        start = self.log_offset if logs.header_end(self.log_path) else 0
        return logs.tail(self.log_path, lines, start=start)

    async def stop(self, sig: signal.Signals, timeout: float, *, force: bool = False) -> StopResult:
        """Stop the whole tree: `sig`, up to `timeout` seconds, then SIGKILL (at once with force)."""
        self.stopping = True
        began = time.monotonic()
        # Scanning processes takes milliseconds: off the event loop, which carries the proxy.
        loop = asyncio.get_running_loop()
        tree = await loop.run_in_executor(None, self._tree)
        if not tree and (self.returncode is not None or not self._root_alive()):
            return self._stopped(StopResult("gone", 0.0))
        if not force:
            self._signal(sig, tree)
            if await self._wait_gone(tree, timeout):
                return self._stopped(StopResult("graceful", time.monotonic() - began))
        tree = _union(tree, await loop.run_in_executor(None, self._tree))
        if self.cgroup is not None:
            cgroups.kill(self.cgroup)  # also what forks meanwhile
        self._signal(signal.SIGKILL, tree)
        await self._wait_gone(tree, KILL_GRACE)
        tree = _union(tree, await loop.run_in_executor(None, self._tree))
        survivors = tuple(p.pid for p in tree if _alive(p))
        return self._stopped(StopResult("forced", time.monotonic() - began, survivors))

    def _stopped(self, result: StopResult) -> StopResult:
        """The cgroup of a stopped instance goes (the kernel refuses while a process is
        in it: then it stays, for the next daemon's sweep)."""
        if self.cgroup is not None:
            cgroups.remove(self.cgroup)
        return result

    def _tree(self) -> list[psutil.Process]:
        """The root and its descendants, whatever else is in its process group
        (children whose parent exited are reparented away from the root), and
        whatever still carries its marker (double forks leave both).

        Every one of these started after the root, so only newer processes are looked
        at: psutil caches each process's start time, and a scan reads no file of the
        older ones (it runs in a thread, and a thread reading every /proc entry holds
        the GIL away from the event loop, that is, from every request in flight)."""
        newer: dict[int, tuple[psutil.Process, int | None]] = {}
        for proc in _candidates(self.create_time):
            with contextlib.suppress(psutil.Error):
                newer[proc.pid] = (proc, proc.ppid())
        procs: dict[int, psutil.Process] = {}
        if self.pid in newer and self._root_alive():
            children: dict[int | None, list[int]] = {}
            for pid, (_, ppid) in newer.items():
                children.setdefault(ppid, []).append(pid)
            todo = [self.pid]
            while todo:
                pid = todo.pop()
                procs[pid] = newer[pid][0]
                todo.extend(c for c in children.get(pid, ()) if c not in procs)
        for pid, (proc, _) in newer.items():
            if pid in procs:
                continue
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(pid) == self.pid or proc.environ().get(MARKER) == self.marker:
                    procs[pid] = proc
        # What left the group, the tree and the marker is still in the cgroup.
        for pid in cgroups.members(self.cgroup) if self.cgroup is not None else ():
            if pid not in procs:
                with contextlib.suppress(psutil.Error):
                    procs[pid] = newer[pid][0] if pid in newer else psutil.Process(pid)
        return [p for p in procs.values() if _alive(p)]

    def _signal(self, sig: signal.Signals, tree: list[psutil.Process]) -> None:
        """`sig` once to each process of `tree`: a second SIGINT is "force quit" to
        uvicorn, which then skips its shutdown hooks. The group signal reaches the
        group's members, and what forks between our scan and now; it is sent only while
        the group is provably ours (a member found above). The others (a new session,
        a double fork) each get one of their own."""
        grouped = False
        if any(_pgid(p) == self.pid for p in tree):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
                grouped = True
        for proc in tree:
            # The group is read after the group signal: one that left it since the scan
            # still gets its signal.
            if grouped and _pgid(proc) == self.pid:
                continue
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    async def _wait_gone(self, tree: list[psutil.Process], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait(), timeout)
        while time.monotonic() < deadline:
            if not any(_alive(p) for p in tree):
                return True
            await asyncio.sleep(POLL)
        return not any(_alive(p) for p in tree)


def _candidates(since: float) -> Iterator[psutil.Process]:
    """Processes that could belong to an instance created at `since`: ours, and not older.
    The start time is checked first: psutil keeps it, so an older process costs no read."""
    uid = os.getuid()
    for proc in psutil.process_iter():
        try:
            if proc.create_time() + CREATE_TIME_SLACK < since or proc.uids().real != uid:
                continue
        except psutil.Error:
            continue
        yield proc


def marked_processes(prefix: str) -> dict[str, list[psutil.Process]]:
    """Live processes whose marker starts with `prefix`, by marker: what instances of a
    state_dir left behind, whatever the state file says."""
    found: dict[str, list[psutil.Process]] = {}
    for proc in _candidates(0.0):
        with contextlib.suppress(psutil.Error, OSError):
            marker = proc.environ().get(MARKER, "")
            if marker.startswith(prefix) and _alive(proc):
                found.setdefault(marker, []).append(proc)
    return found


def _create_log(log_dir: Path, path: Path, header: bytes) -> int:
    """Create the instance's log file with rotator's header; where its own output will
    begin. A full disk or an unusable directory is a SpawnError: a start that failed."""
    try:
        return logs.create(path, header)
    except FileExistsError:  # mkdir found something that is not a directory
        reason = os_error(
            NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(log_dir))
        )
    except OSError as exc:
        _discard(path)
        reason = os_error(exc)
    raise SpawnError(f"cannot create its log file: {reason}")


def _discard(log: Path, cgroup: Path | None = None) -> None:
    """The log (and cgroup) of a command that never ran: no pid to name it by, and the
    error says it all."""
    with contextlib.suppress(OSError):
        log.unlink()
    if cgroup is not None:
        cgroups.remove(cgroup)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


def _union(a: list[psutil.Process], b: list[psutil.Process]) -> list[psutil.Process]:
    seen = {p.pid: p for p in a}
    for p in b:
        seen.setdefault(p.pid, p)
    return list(seen.values())


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
