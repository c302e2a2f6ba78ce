"""The watching process: watchfiles in a process of its own (rotator.watcher, the daemon's
side, starts it, and describes the protocol).

Why a process: watchfiles sets its watches up in one call that walks the tree while it
holds the GIL. In the daemon, whether through `awatch` or from a thread of its own, that
stalled the event loop, and every request in flight, for as long: a 1 ms ticker's longest
gap was 320-390 ms while watching this repository's 700-directory virtualenv (against
3-6 ms without; measured on a loaded 2-core machine), and a node_modules holds tens of
thousands of directories. Matching the changes against each component's `watch` and
`watch_ignore` is done here too, so that a flood of changes (an npm install) costs the
daemon nothing either. Besides the standard library and watchfiles, it imports only the
pure config model.

Here: which changed paths concern a component (Matcher, pure), which directories to
watch for it (watch_roots), and the process's loop (serve).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from rotator.config import WatchSpec, watch_base

# watchfiles' own grouping: a batch is handed over once no change came for STEP_MS (or
# after GROUP_MAX_MS of changes without a pause); the component's debounce comes after.
STEP_MS = 50
GROUP_MAX_MS = 1000
POLL_DELAY_MS = 300  # with WATCHFILES_FORCE_POLLING set (a network file system, say)
# Paths named per component in one message; the rest are counted (`more`).
MAX_NAMES = 100


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
        self.cwd, self.spec = cwd, spec
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


def serve(fd: int) -> None:
    """Watch what the daemon asks on the channel `fd`, and report each batch of changes by
    component; return when the daemon's end closes (or watching fails, said first)."""
    channel = socket.socket(fileno=fd)
    incoming = channel.makefile("rb")
    line = incoming.readline()
    if not line:
        return
    matchers = {
        name: Matcher(os.path.realpath(c["cwd"]), WatchSpec(tuple(c["paths"]), tuple(c["ignore"])))
        for name, c in json.loads(line)["components"].items()
    }
    roots = outermost(
        root for m in matchers.values() for root in watch_roots(m.cwd, m.spec, os.path.isdir)
    )
    stop = threading.Event()

    def until_closed() -> None:
        with contextlib.suppress(OSError):
            incoming.read()  # nothing more comes: this returns when the daemon's end closes
        stop.set()

    threading.Thread(target=until_closed, daemon=True).start()

    def send(message: dict[str, Any]) -> None:
        channel.sendall(json.dumps(message).encode() + b"\n")

    try:
        _watch(roots, stop, matchers, send)
    except OSError:
        pass  # the daemon is gone
    except Exception as exc:  # a watch limit reached, a root removed: say so and end
        with contextlib.suppress(OSError):
            send({"error": f"{type(exc).__name__}: {exc}"})


def _watch(
    roots: list[str],
    stop: threading.Event,
    matchers: dict[str, Matcher],
    send: Callable[[dict[str, Any]], None],
) -> None:
    # watchfiles' RustNotify (its documented Rust backend) rather than watchfiles.watch():
    # the daemon must learn when the watches are set, and watch() never says.
    from watchfiles._rust_notify import RustNotify

    polling = "WATCHFILES_FORCE_POLLING" in os.environ  # as watchfiles.watch() does
    with RustNotify(roots, False, polling, POLL_DELAY_MS, True, False) as notify:
        send({"ready": roots})
        while True:
            changes = notify.watch(GROUP_MAX_MS, STEP_MS, 0, stop)
            if changes == "stop":
                return
            if isinstance(changes, str):  # "timeout" or "signal": neither comes here
                continue
            paths = sorted({path for _, path in changes})
            changed, more = {}, {}
            for name, m in matchers.items():
                if names := [m.relative(p) for p in paths if m.matches(p)]:
                    changed[name] = names[:MAX_NAMES]
                    if len(names) > MAX_NAMES:
                        more[name] = len(names) - MAX_NAMES
            if changed:
                send({"changed": changed, "more": more})
