"""Restart on save: a changed file becomes a zero-downtime rotation of its component.

One watchfiles watcher per daemon (the Rust notify crate: inotify on Linux, FSEvents on
macOS) watches the directories that the components' `watch` entries name, in a thread of
its own, and hands each batch of changed paths to the event loop. There, per component,
a Matcher (pure) keeps the paths its `watch` names and its `watch_ignore` does not, and a
Coalescer (pure) decides when to rotate: once `watch_debounce` has passed without a
further change, never while a rotation runs; what changes meanwhile waits for exactly one
more rotation after it. The rotation is Component.rotate(Reason.WATCH), replica by replica;
if the new code does not start or become healthy, the old instances keep serving and one
`watch` event says why, with the new instance's last log lines; the next save tries again.
A component stopped on purpose, running a canary, or being handed to a new daemon is not
rotated by a save (said once, until that changes).

Why a thread of our own rather than watchfiles' `awatch`: setting the watches up is a
synchronous call that walks the tree (136 ms for a 700-directory virtualenv, measured on
the CI machine; seconds for a node_modules), which `awatch` makes on the event loop, where
it would stall every proxied request; and `awatch` borrows a thread from anyio's pool,
which has 40, one per watcher for as long as it runs. One watcher for the daemon means one
thread and one inotify instance however many components watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from rotator.component import Component, RotationFailed
from rotator.config import WatchSpec, watch_base
from rotator.events import Kind, Reason

# watchfiles' own grouping, under the component's debounce: a batch is handed over once
# no change came for STEP ms (or after GROUP_MAX ms of changes without a pause).
STEP_MS = 50
GROUP_MAX_MS = 1000
# How long close() waits for the watching thread to see its stop event (it looks every STEP).
STOP_TIMEOUT = 2.0
# Files named in one event; more are counted.
NAMED = 3


# -- pure: which paths matter, and when to rotate -------------------------------------------


def glob_pattern(pattern: str) -> re.Pattern[str]:
    """A glob as a regex on a relative path: `*` and `?` stay within one name, `**/` spans
    any number of directories (none included), `[...]` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.DOTALL)


class Matcher:
    """Which changed paths concern one component: those its `watch` entries name (a path
    and everything under it, or a glob on the path relative to `cwd`) and no `ignore`
    pattern matches (one without `/` matches any one name in the path; one with `/` the
    path from `cwd` or a directory of it). Pure: `cwd` and the paths are absolute and real."""

    def __init__(self, cwd: str, spec: WatchSpec) -> None:
        self.cwd = cwd
        globs = [p for p in spec.paths if watch_base(p) != p]
        self._targets = [
            os.path.normpath(os.path.join(cwd, p)) for p in spec.paths if p not in globs
        ]
        self._globs = [glob_pattern(os.path.normpath(p)) for p in globs]
        self._names = [glob_pattern(p) for p in spec.ignore if "/" not in p.strip("/")]
        self._dirs = [glob_pattern(p.strip("/")) for p in spec.ignore if "/" in p.strip("/")]

    def relative(self, path: str) -> str:
        """How an event names the path: from `cwd`, or absolute when outside it."""
        rel = os.path.relpath(path, self.cwd)
        return path if rel.startswith("..") else rel

    def matches(self, path: str) -> bool:
        rel = os.path.relpath(path, self.cwd)
        watched = any(path == t or path.startswith(t.rstrip("/") + "/") for t in self._targets)
        if not watched and not any(g.fullmatch(rel) for g in self._globs):
            return False
        parts = rel.split("/")
        if any(p.fullmatch(name) for p in self._names for name in parts):
            return False
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        return not any(p.fullmatch(prefix) for p in self._dirs for prefix in prefixes)


def watch_roots(cwd: str, spec: WatchSpec, is_dir: Callable[[str], bool]) -> list[str]:
    """The directories to watch (recursively) for a component: each entry's directory (a
    file's parent, so that an editor that saves by replacing the file is still seen; a
    glob's directory before its first wildcard), without those inside another."""
    roots = []
    for entry in spec.paths:
        path = os.path.normpath(os.path.join(cwd, watch_base(entry)))
        roots.append(path if entry != watch_base(entry) or is_dir(path) else os.path.dirname(path))
    return outermost(roots)


def outermost(paths: Iterable[str]) -> list[str]:
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


class Coalescer:
    """When a component rotates for its changed files: once `debounce` seconds passed
    since the last change, and not while a rotation runs; what changes during one waits
    for exactly one more after it. Pure: times are given."""

    def __init__(self, debounce: float) -> None:
        self.debounce = debounce
        self.changed: dict[str, None] = {}  # an ordered set: the files, first changed first
        self.last: float | None = None
        self.rotating = False
        self.held: str | None = None  # why rotations are held back, once said

    def change(self, names: Iterable[str], now: float) -> None:
        self.changed.update(dict.fromkeys(names))
        self.last = now

    def due_in(self, now: float) -> float | None:
        """Seconds until a rotation should begin (0: now); None when none is due."""
        if self.rotating or not self.changed or self.last is None:
            return None
        return max(0.0, self.last + self.debounce - now)

    def begin(self) -> list[str]:
        """A rotation begins: the files it answers for."""
        names, self.changed = list(self.changed), {}
        self.rotating, self.held = True, None
        return names

    def end(self) -> None:
        self.rotating = False

    def hold(self, why: str) -> tuple[list[str], bool]:
        """No rotation now, for `why`: the files dropped, and whether to say so (only when
        `why` is news)."""
        names, self.changed = list(self.changed), {}
        news, self.held = why != self.held, why
        return names, news


def files_phrase(names: list[str]) -> str:
    """'app.py', 'a.py, b.py' or 'a.py, b.py, c.py and 4 more'."""
    shown = ", ".join(names[:NAMED])
    return shown if len(names) <= NAMED else f"{shown} and {len(names) - NAMED} more"


# -- side effects: the watching thread, and each component's rotations ----------------------


class ComponentWatch:
    """One component's changes, and the task that rotates it for them."""

    def __init__(self, comp: Component) -> None:
        self.comp = comp
        self.spec = comp.config_spec.watch
        cwd = os.path.realpath(comp.config_spec.cwd)
        self.matcher = Matcher(cwd, self.spec)
        self.roots = watch_roots(cwd, self.spec, os.path.isdir)
        self.coalescer = Coalescer(self.spec.debounce)
        self._kick = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    @property
    def key(self) -> tuple[int, WatchSpec, Path]:
        return id(self.comp), self.spec, self.comp.config_spec.cwd

    def changed(self, paths: Iterable[str]) -> None:
        names = [self.matcher.relative(p) for p in paths if self.matcher.matches(p)]
        if names:
            self.coalescer.change(names, time.monotonic())
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
            names, news = self.coalescer.hold(why)
            if news:
                comp.emit(Kind.WATCH, f"{files_phrase(names)} changed; not rotating: {why}")
            return
        names = self.coalescer.begin()
        files = files_phrase(names)
        comp.emit(Kind.WATCH, f"{files} changed, rotating", files=names)
        try:
            await comp.rotate(Reason.WATCH)
        except RotationFailed as exc:
            pids = ", ".join(str(s.instance.pid) for s in comp.serving.values())
            kept = f"pid {pids} keeps serving" if pids else "nothing serves"
            comp.emit(
                Kind.WATCH,
                f"rotation for {files} failed: {exc.reason}; {kept}; the next save tries again",
                files=names,
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

    def cancel(self) -> None:
        self.task.cancel()


class Watcher:
    """The daemon's file watching: one thread watches the union of every component's
    roots; configure() follows the components (at start and after each reload)."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self.watches: dict[str, ComponentWatch] = {}
        self.roots: list[str] = []
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def configure(self, components: Mapping[str, Component]) -> None:
        """Watch what `components` ask for now; a component whose watch settings (and cwd)
        did not change keeps its pending changes, and the thread is restarted only when
        the directories change."""
        wanted = {n: c for n, c in components.items() if c.config_spec.watch.paths}
        for name, watch in list(self.watches.items()):
            comp = wanted.get(name)
            if comp is None or watch.key != (
                id(comp),
                comp.config_spec.watch,
                comp.config_spec.cwd,
            ):
                watch.cancel()
                del self.watches[name]
        for name, comp in wanted.items():
            if name not in self.watches:
                self.watches[name] = ComponentWatch(comp)
        roots = outermost(r for w in self.watches.values() for r in w.roots)
        if roots != self.roots:
            self._restart(roots)

    def _restart(self, roots: list[str]) -> None:
        if self._stop is not None:
            self._stop.set()  # the old thread ends within a STEP
        self.roots, self._stop, self._thread = roots, None, None
        if not roots:
            return
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        thread = threading.Thread(
            target=_watch, args=(roots, stop, loop, self._dispatch, self._failed), daemon=True
        )
        thread.name = "rotator-watch"
        thread.start()
        self._stop, self._thread = stop, thread
        names = ", ".join(self.watches)
        self._out(f"rotator: restart on save: watching {len(roots)} path(s) for {names}")

    def _dispatch(self, paths: list[str]) -> None:
        for watch in list(self.watches.values()):
            watch.changed(paths)

    def _failed(self, error: str) -> None:
        self._out(f"rotator: warning: restart on save stopped: {error}")
        self.roots = []  # the next reload that changes the watch tries again

    async def close(self) -> None:
        for watch in self.watches.values():
            watch.cancel()
        await asyncio.gather(*(w.task for w in self.watches.values()), return_exceptions=True)
        self.watches.clear()
        thread = self._thread
        self._restart([])
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, STOP_TIMEOUT)


def _watch(
    roots: list[str],
    stop: threading.Event,
    loop: asyncio.AbstractEventLoop,
    dispatch: Callable[[list[str]], None],
    failed: Callable[[str], None],
) -> None:
    """The watching thread: every batch of changed paths goes to `dispatch` on the loop."""
    import watchfiles  # only a daemon that watches loads it

    def post(call: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the daemon is gone
            loop.call_soon_threadsafe(call, *args)

    try:
        for changes in watchfiles.watch(
            *roots,
            watch_filter=None,  # each component's Matcher filters
            debounce=GROUP_MAX_MS,
            step=STEP_MS,
            stop_event=stop,
            rust_timeout=0,
            raise_interrupt=False,
        ):
            post(dispatch, sorted({path for _, path in changes}))
    except Exception as exc:  # a watch limit reached, a root removed: say so, serve on
        post(failed, f"{type(exc).__name__}: {exc}")
