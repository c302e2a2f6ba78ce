"""The event history on disk: state_dir/events.log, one JSON object per line.

The daemon appends every event as it happens (no fsync: losing the last lines
in a power cut is acceptable, slowing a rotation is not) and, on start, reads
the newest lines back so `rotator events` spans daemon restarts. Past
MAX_BYTES the file is renamed to events.log.1 (replacing an older one) and a
new one begun, so the history on disk stays bounded at about twice that.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO

from rotator.events import Event

MAX_BYTES = 4 * 1024 * 1024


class EventLog:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._file: IO[str] | None = None
        self._size = 0

    def load(self, count: int) -> list[Event]:
        """The newest `count` events on disk, oldest first; lines that do not parse are skipped
        (a line cut short by a crash, say)."""
        lines: list[str] = []
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
                lines.extend(f)
        # Parsed from the end, only as far as needed: the files hold thousands of events
        # and start-up wants the newest `count`.
        newest: list[Event] = []
        for line in reversed(lines):
            if len(newest) >= count:
                break
            event = _parse(line)
            if event is not None:
                newest.append(event)
        return newest[::-1]

    def append(self, event: Event) -> None:
        line = json.dumps(event.to_json(), default=str) + "\n"
        try:
            if self._file is None or self._size + len(line) > self.max_bytes:
                self._open(rotate=self._file is not None)
            assert self._file is not None
            self._file.write(line)
            self._file.flush()
            self._size += len(line)
        except OSError:
            self.close()  # a full disk must not stop the daemon; the next event tries again

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _open(self, rotate: bool) -> None:
        self.close()
        if rotate or (self.path.exists() and self.path.stat().st_size > self.max_bytes):
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._size = self._file.tell()


def _parse(line: str) -> Event | None:
    try:
        data = json.loads(line)
        return Event.from_json(data)
    except (ValueError, TypeError, KeyError):
        return None
