"""Restart on save: a changed file becomes a zero-downtime rotation of its component.

The watching itself runs in a process of the daemon's own (rotator.watcher_process, which
says why): watchfiles (the Rust notify crate: inotify on Linux, FSEvents on macOS) over the
directories every component's `watch` names, each change matched there against the
component's `watch` and `watch_ignore`. Here, per component, a Coalescer (pure) decides
when to rotate: once `watch_debounce` has passed without a further change, never while a
rotation runs; what changes meanwhile waits for exactly one more rotation after it. The
rotation is Component.rotate(Reason.WATCH), replica by replica; if the new code does not
start or become healthy, the old instances keep serving and one `watch` event says why,
with the new instance's last log lines; the next save tries again. A component stopped
on purpose, running a canary, or being handed to a new daemon is not rotated by a save
(said once, until that changes).

Protocol, one JSON object per line over a socket pair:
  daemon -> watcher  {"components": {name: {"cwd": ..., "paths": [...], "ignore": [...]}}},
                     once; the watcher is replaced when that changes (a reload)
  watcher -> daemon  {"ready": [directory, ...]} once its watches are set
                     {"changed": {name: [path, ...]}, "more": {name: n}} per batch of
                     changes: paths relative to the component's cwd (absolute outside it),
                     at most watcher_process.MAX_NAMES each, `n` more not named
                     {"error": "..."} when watching failed; it then exits
The watcher exits when the daemon's end of the channel closes (the daemon stopped or died).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from rotator.component import Component, RotationFailed
from rotator.events import Kind, Reason
from rotator.spawner import reap

# Files named in one event; more are counted.
NAMED = 3
# How long a watcher whose channel closed may take to exit before it is killed.
CLOSE_TIMEOUT = 2.0
# A message names at most MAX_NAMES paths per component: well within this.
LINE_LIMIT = 4 * 1024 * 1024
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from rotator.watcher_process import serve; serve(int(sys.argv[2]))"
)
_ROOT = str(Path(__file__).resolve().parents[1])


# -- pure: when to rotate -------------------------------------------------------------------


class Coalescer:
    """When a component rotates for its changed files: once `debounce` seconds passed
    since the last change, and not while a rotation runs; what changes during one waits
    for exactly one more after it. Pure: times are given."""

    def __init__(self, debounce: float) -> None:
        self.debounce = debounce
        self.changed: dict[str, None] = {}  # an ordered set: the files, first changed first
        self.more = 0  # changed files not named (a flood)
        self.last: float | None = None
        self.rotating = False
        self.held: str | None = None  # why rotations are held back, once said

    def change(self, names: Iterable[str], now: float, more: int = 0) -> None:
        self.changed.update(dict.fromkeys(names))
        self.more += more
        self.last = now

    def due_in(self, now: float) -> float | None:
        """Seconds until a rotation should begin (0: now); None when none is due."""
        if self.rotating or not self.changed or self.last is None:
            return None
        return max(0.0, self.last + self.debounce - now)

    def begin(self) -> str:
        """A rotation begins: the files it answers for, as a phrase."""
        self.rotating, self.held = True, None
        return self._take()

    def end(self) -> None:
        self.rotating = False

    def hold(self, why: str) -> tuple[str, bool]:
        """No rotation now, for `why`: the files dropped, and whether to say so (only when
        `why` is news)."""
        news, self.held = why != self.held, why
        return self._take(), news

    def _take(self) -> str:
        names, more = list(self.changed), self.more
        self.changed, self.more = {}, 0
        return files_phrase(names, more)


def files_phrase(names: list[str], more: int = 0) -> str:
    """'app.py', 'a.py, b.py' or 'a.py, b.py, c.py and 4 more'."""
    shown = ", ".join(names[:NAMED])
    rest = len(names[NAMED:]) + more
    return f"{shown} and {rest} more" if rest else shown


# -- side effects: the watching process, and each component's rotations ---------------------


class ComponentWatch:
    """One component's changes, and the task that rotates it for them."""

    def __init__(self, comp: Component) -> None:
        self.comp = comp
        self.spec = comp.config_spec.watch
        self.cwd = comp.config_spec.cwd
        self.coalescer = Coalescer(self.spec.debounce)
        self._kick = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    def serves(self, comp: Component) -> bool:
        """Whether this still watches for `comp` as it is configured now."""
        return comp is self.comp and (comp.config_spec.watch, comp.config_spec.cwd) == (
            self.spec,
            self.cwd,
        )

    def request(self) -> dict[str, Any]:
        return {
            "cwd": str(self.cwd),
            "paths": list(self.spec.paths),
            "ignore": list(self.spec.ignore),
        }

    def changed(self, names: list[str], more: int) -> None:
        self.coalescer.change(names, time.monotonic(), more)
        self._kick.set()

    async def _run(self) -> None:
        while True:
            wait = self.coalescer.due_in(time.monotonic())
            if wait != 0:
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), wait)
                continue
            await self._rotate()

    async def _rotate(self) -> None:
        comp = self.comp
        if why := self._held_by():
            files, news = self.coalescer.hold(why)
            if news:
                comp.emit(Kind.WATCH, f"{files} changed; not rotating: {why}")
            return
        files = self.coalescer.begin()
        comp.emit(Kind.WATCH, f"{files} changed, rotating", files=files)
        try:
            await comp.rotate(Reason.WATCH, says_failure=False)  # said below, in one event
        except RotationFailed as exc:
            pids = ", ".join(str(s.instance.pid) for s in comp.serving.values())
            kept = f"pid {pids} keeps serving" if pids else "nothing serves"
            comp.emit(
                Kind.WATCH,
                f"rotation for {files} failed: {exc.reason}; {kept}; the next save tries again",
                files=files,
                error=exc.reason,
                log_tail=exc.log_tail,
            )
        finally:
            self.coalescer.end()

    def _held_by(self) -> str | None:
        comp = self.comp
        if comp.suspended:
            return "a new rotator daemon is taking over"
        if comp.stopped_on_purpose:
            return f"stopped on purpose (`rotator start {comp.name}` runs it)"
        if comp.canary is not None:
            return f"a canary is running (`rotator promote` or `rollback {comp.name}` ends it)"
        return None


class Watcher:
    """The daemon's restart on save: one watching process for every component's `watch`;
    configure() follows the components (at start and after each reload)."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self.watches: dict[str, ComponentWatch] = {}
        self._request: dict[str, Any] = {}
        self._reading: asyncio.Task[None] | None = None
        self._reaping: set[asyncio.Task[None]] = set()

    def configure(self, components: Mapping[str, Component]) -> None:
        """Watch what `components` ask for now. A component whose watch settings (and cwd)
        did not change keeps its pending changes; the watching process is replaced only
        when what it watches changes."""
        wanted = {n: c for n, c in components.items() if c.config_spec.watch.paths}
        for name, watch in list(self.watches.items()):
            if name not in wanted or not watch.serves(wanted[name]):
                watch.task.cancel()
                del self.watches[name]
        for name, comp in wanted.items():
            if name not in self.watches:
                self.watches[name] = ComponentWatch(comp)
        request = {name: w.request() for name, w in self.watches.items()}
        if request != self._request:
            self._request = request
            self._restart()

    def _restart(self) -> None:
        if self._reading is not None:
            self._reading.cancel()  # closes the channel: the old process exits
            self._reading = None
        if not self._request:
            return
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, _ROOT, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
                process_group=0,  # a terminal's Ctrl-C goes to the daemon, which decides
            )
        except OSError as exc:
            ours.close()
            self._failed(f"cannot start the watching process: {exc}")
            return
        finally:
            theirs.close()
        self._reading = asyncio.ensure_future(self._read(ours, proc, self._request))

    async def _read(
        self, sock: socket.socket, proc: subprocess.Popen[bytes], request: dict[str, Any]
    ) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        try:
            writer.write(json.dumps({"components": request}).encode() + b"\n")
            error = f"the watching process (pid {proc.pid}) exited"
            while line := await reader.readline():
                message = json.loads(line)
                error = message.get("error", error)
                if "ready" in message:
                    names = ", ".join(request)
                    self._out(f"rotator: restart on save: watching the files of {names}")
                for name, names in message.get("changed", {}).items():
                    if (watch := self.watches.get(name)) is not None:
                        watch.changed(names, message.get("more", {}).get(name, 0))
            self._failed(error)
        except (OSError, ValueError) as exc:
            self._failed(f"the watching process (pid {proc.pid}) failed: {exc}")
        finally:
            writer.close()
            reaping = asyncio.ensure_future(reap(proc, CLOSE_TIMEOUT))
            self._reaping.add(reaping)
            reaping.add_done_callback(self._reaping.discard)

    def _failed(self, error: str) -> None:
        self._out(f"rotator: warning: restart on save stopped: {error}")
        self._request = {}  # the next reload that changes the watch tries again

    async def close(self) -> None:
        tasks = [w.task for w in self.watches.values()]
        for task in tasks:
            task.cancel()
        self.watches.clear()
        self._request = {}
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.cancel()
            tasks.append(reading)
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._reaping)
