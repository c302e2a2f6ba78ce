"""A component's log files: one per instance, and reading them as one log.

Each instance writes straight to its own file, `<UTC start time>-<pid>.log` in
the component's log directory (`state_dir/logs/<name>/`), so file names sort in
start order and name the pid that wrote them (files 0600, directories 0700: an
app's output may hold secrets). The file is created under a temporary name before
the spawn (the pid is not known yet) and renamed once it is; the instance keeps its
descriptor either way. This module creates, names, finds and prunes those files and
reads them: the last lines across a component's files, and the lines written since,
as a poll (`LogReader`). Deciding when to prune and which instances are running is
the component's business; serving the lines is the admin API's.

`logs: {max_size, keep}` rotates a running instance's file (`rotate`): it is copied
to `<file>.1` (older copies shifted to .2 ... .keep) and truncated in place, as
logrotate's copytruncate does. The instance keeps writing through its descriptor,
which is opened for appending, so its next write lands at the new end; nothing it
writes passes through the daemon, which it may outlive. A line written between the
last read of the copy and the truncation is lost (a window of microseconds). Readers
read the copies before the file, and a follower picks up the end of the copy when
it finds the file rotated. Rotating and reading both happen in the daemon, under one
lock, so a reader never sees a rotation half done.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

# Instance files kept per component; the files of running instances are kept on top.
LOG_FILES_KEPT = 10
# How often a follower looks for growth.
FOLLOW_POLL = 0.2
# Most bytes read from one file per poll: what a follower holds in memory per file.
READ_CHUNK = 256 * 1024
# Lines longer than this are cut into pieces (bounds the partial line a follower holds).
MAX_LINE = 64 * 1024
# History reads a file backwards, a block at a time, at most this far looking for its
# last lines (10 000 lines of 1.6 KiB each).
TAIL_BLOCK = 64 * 1024
TAIL_MAX_BYTES = 16 * 1024 * 1024
# A file still under its temporary name this long after it was last written is a
# leftover: the daemon was killed between the spawn and the rename (which are
# milliseconds apart), so nothing will ever give it its name.
STALE_STARTING = 600.0
# A partial last line is sent after this many polls without growth (the writer may
# never finish it: a prompt, or an instance that died mid-line).
PARTIAL_FLUSH_POLLS = 5

HEADER = b"==== rotator: "
_FILE = re.compile(r"^(\d{8}-\d{6}\.\d{3})-(\d+)\.log$")
_STARTING = ".starting"
_ROTATED = re.compile(r"^(.+\.log)\.(\d+)$")
# Held while a file is rotated, and while a reader reads: see the module docstring.
_ROTATION = threading.Lock()

Line = tuple[int, str]  # (pid, text)


def _stamp(when: float) -> str:
    """Sorts like the time it stands for; UTC, so that no clock change reorders files."""
    millis = int(when * 1000) % 1000
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(when)) + f".{millis:03d}"


def starting_path(log_dir: Path, when: float | None = None) -> Path:
    """Where an instance's output goes until its pid is known (see `named_for`).
    Hidden and without a pid: readers and pruning never see it."""
    stamp = _stamp(time.time() if when is None else when)
    return log_dir / f".{stamp}-{uuid.uuid4().hex[:8]}{_STARTING}"


def create(starting: Path, header: bytes) -> int:
    """Create an instance's file (and the directories it goes in) with rotator's header,
    readable by the daemon's user alone: an app's output may hold secrets. Where the
    instance's own output begins."""
    starting.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    starting.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(starting, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "ab") as log:
        log.write(header)
        return log.tell()


def named_for(starting: Path, pid: int) -> Path:
    """The file name an instance's log gets once its pid is known."""
    stamp = starting.name[1:].rsplit("-", 1)[0]
    return starting.with_name(f"{stamp}-{pid}.log")


def pid_of(path: Path) -> int | None:
    match = _FILE.match(path.name)
    return int(match.group(2)) if match else None


def instance_files(log_dir: Path, pid: int | None = None) -> list[Path]:
    """The component's instance files in start order; only those of `pid` if given."""
    return _instance_files(log_dir, _names(log_dir), pid)


def _instance_files(log_dir: Path, names: list[str], pid: int | None = None) -> list[Path]:
    found = []
    for name in names:
        match = _FILE.match(name)
        if match and (pid is None or int(match.group(2)) == pid):
            found.append(log_dir / name)
    return sorted(found, key=lambda p: p.name)


def _names(log_dir: Path) -> list[str]:
    try:
        return os.listdir(log_dir)
    except OSError:
        return []


def pids(log_dir: Path) -> list[int]:
    """The pids that have a file, in start order."""
    return list(dict.fromkeys(pid for path in instance_files(log_dir) if (pid := pid_of(path))))


def find(log_dir: Path, pid: int) -> Path | None:
    """The file of the latest instance with this pid (a pid can come back), if any."""
    files = instance_files(log_dir, pid)
    return files[-1] if files else None


def prune(log_dir: Path, running: Collection[int], keep: int = LOG_FILES_KEPT) -> list[Path]:
    """Remove all but the newest `keep` files, never one of a `running` pid, and stale
    temporary files; the removed."""
    names = _names(log_dir)
    removed = _stale_starting(log_dir, names)
    files = _instance_files(log_dir, names)
    for path in files[: max(0, len(files) - keep)]:
        if pid_of(path) in running:
            continue
        for each in [path, *_rotated_files(path, names)]:
            with contextlib.suppress(OSError):  # gone already, or a read-only disk: it stays
                each.unlink()
                removed.append(each)
    return removed


def rotated_path(path: Path, n: int) -> Path:
    """The n-th newest copy of a rotated instance file: <file>.1 is the latest."""
    return path.with_name(f"{path.name}.{n}")


def rotated_files(path: Path) -> list[Path]:
    """The rotated copies of an instance file, oldest first (<file>.keep ... <file>.1)."""
    return _rotated_files(path, _names(path.parent))


def _rotated_files(path: Path, names: list[str]) -> list[Path]:
    found = [
        (int(m[2]), name) for name in names if (m := _ROTATED.match(name)) and m[1] == path.name
    ]
    return [path.with_name(name) for _, name in sorted(found, reverse=True)]


def rotate(path: Path, keep: int) -> None:
    """Copy the file to <file>.1, shifting older copies up to <file>.keep (the oldest
    goes), then truncate it in place. OSError if it cannot be done (nothing is lost)."""
    with _ROTATION:
        for n in range(keep, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                if n == keep:
                    rotated_path(path, n).unlink()
                else:
                    os.replace(rotated_path(path, n), rotated_path(path, n + 1))
        copy = path.with_name(f".{path.name}.rotating")
        try:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(path, "rb") as source, os.fdopen(fd, "wb") as target:
                # Until a read finds nothing more: the truncation follows it at once.
                while chunk := source.read(READ_CHUNK):
                    target.write(chunk)
        except OSError:
            with contextlib.suppress(OSError):
                copy.unlink()
            raise
        os.truncate(path, 0)
        os.replace(copy, rotated_path(path, 1))


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which file is at `path` (a rotation puts a new one at <file>.1), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _stale_starting(log_dir: Path, names: list[str]) -> list[Path]:
    removed = []
    for name in names:
        if not (name.startswith(".") and name.endswith(_STARTING)):
            continue
        path = log_dir / name
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > STALE_STARTING:
                path.unlink()
                removed.append(path)
    return removed


def header_end(path: Path) -> int:
    """Where the instance's own output begins: after rotator's header line, if any."""
    try:
        with open(path, "rb") as f:
            first = f.readline(MAX_LINE)
    except OSError:
        return 0
    return len(first) if first.startswith(HEADER) and first.endswith(b"\n") else 0


def tail(path: Path, lines: int, start: int = 0) -> list[str]:
    """The last lines of a file from offset `start` on, a partial last one included."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            complete, partial = _last_lines(f.fileno(), start, end, lines)
    except OSError:
        return []
    if partial:
        complete.append(partial)
    return [_text(line) for line in complete[-lines:]] if lines > 0 else []


def _last_lines(fd: int, start: int, end: int, n: int) -> tuple[list[bytes], bytes]:
    """The last `n` complete lines in [start, end), and the partial line after them."""
    pos, newlines, blocks = end, 0, []
    while pos > start and newlines <= n and end - pos < TAIL_MAX_BYTES:
        step = min(TAIL_BLOCK, pos - start)
        pos -= step
        blocks.append(os.pread(fd, step, pos))
        newlines += blocks[-1].count(b"\n")
    *complete, partial = b"".join(reversed(blocks)).split(b"\n")
    if pos > start and complete:
        complete = complete[1:]  # began mid-line
    pieces = [piece for line in complete for piece in _pieces(line)]
    return pieces[-n:] if n > 0 else [], partial


def _whole_lines(path: Path, n: int) -> list[bytes]:
    """The last `n` lines of a rotated copy, a partial last one (cut by the rotation) included."""
    try:
        with open(path, "rb") as f:
            complete, partial = _last_lines(f.fileno(), 0, f.seek(0, os.SEEK_END), n)
    except OSError:
        return []
    return ([*complete, partial] if partial else complete)[-n:] if n > 0 else []


def _pieces(line: bytes) -> Iterator[bytes]:
    if len(line) <= MAX_LINE:
        yield line
        return
    for i in range(0, len(line), MAX_LINE):
        yield line[i : i + MAX_LINE]


def _text(line: bytes) -> str:
    return line.removesuffix(b"\r").decode(errors="replace")


@dataclass
class _Tracked:
    pid: int
    offset: int  # read up to here
    pending: bytes = b""  # a partial last line, held until it ends
    idle: int = 0  # polls without growth while something is pending
    rotated: tuple[int, int, int] | None = None  # the <file>.1 seen last (see _identity)


class LogReader:
    """A component's log across its instance files (or one pid's): the last lines,
    then, poll by poll, what was written since, in files that appear later too.
    Not thread-safe: one caller at a time (the admin API runs it in a thread)."""

    def __init__(self, log_dir: Path, pid: int | None = None) -> None:
        self.log_dir = log_dir
        self.pid = pid
        self._tracked: dict[str, _Tracked] = {}

    def history(self, n: int, *, follow: bool = False) -> list[Line]:
        """The last `n` lines across the files in start order. When following, a partial
        last line is held back, to be sent whole by `poll`."""
        with _ROTATION:
            files = instance_files(self.log_dir, self.pid)
            found: list[Line] = []
            for path in reversed(files):
                pid = pid_of(path) or 0
                try:
                    with open(path, "rb") as f:
                        end = f.seek(0, os.SEEK_END)
                        want = n - len(found)
                        complete, partial = _last_lines(f.fileno(), 0, end, want)
                except OSError:
                    continue
                tracked = self._tracked[path.name] = _Tracked(pid, end)
                tracked.rotated = _identity(rotated_path(path, 1))
                if follow:
                    tracked.pending = partial
                elif partial:
                    complete.append(partial)
                for older in reversed(rotated_files(path)):  # the newest copy first
                    if len(complete) >= want:
                        break
                    complete[:0] = _whole_lines(older, want - len(complete))
                mine = [(pid, _text(line)) for line in complete]
                found[:0] = mine[-want:] if want > 0 else []
            return found

    @property
    def files(self) -> list[str]:
        """The names of the files seen so far."""
        return sorted(self._tracked)

    def poll(self, *, final: bool = False) -> tuple[list[Line], bool]:
        """The lines written since the last call, and whether more is waiting already
        (this call stopped at READ_CHUNK for a file). `final` sends partial lines too."""
        out: list[Line] = []
        behind = False
        with _ROTATION:
            files = instance_files(self.log_dir, self.pid)
            names = {path.name for path in files}
            for name in [n for n in self._tracked if n not in names]:  # pruned, or renamed away
                self._flush(self._tracked.pop(name), out)
            for path in files:
                tracked = self._tracked.get(path.name)
                if tracked is None:
                    tracked = self._tracked[path.name] = _Tracked(pid_of(path) or 0, 0)
                    tracked.rotated = _identity(rotated_path(path, 1))
                behind = self._read(path, tracked, out) or behind
                if final or (tracked.pending and tracked.idle >= PARTIAL_FLUSH_POLLS):
                    self._flush(tracked, out)
        return out, behind

    def _read(self, path: Path, tracked: _Tracked, out: list[Line]) -> bool:
        copy = rotated_path(path, 1)
        if (now := _identity(copy)) != tracked.rotated:
            # Rotated since the last poll: the copy holds what was written up to the
            # truncation; the file goes on from 0.
            tracked.rotated = now
            if now is not None:
                with contextlib.suppress(OSError), open(copy, "rb") as f:
                    f.seek(tracked.offset)
                    self._take(tracked, f.read(), out)
                tracked.offset = 0
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size < tracked.offset:  # truncated by someone else: start over
                    tracked.offset, tracked.pending = 0, b""
                chunk = os.pread(f.fileno(), min(size - tracked.offset, READ_CHUNK), tracked.offset)
        except OSError:
            return False
        if not chunk:
            tracked.idle += 1
            return False
        tracked.offset += len(chunk)
        self._take(tracked, chunk, out)
        return tracked.offset < size

    @staticmethod
    def _take(tracked: _Tracked, chunk: bytes, out: list[Line]) -> None:
        """The complete lines of `chunk` (after what was pending) go out; the rest waits."""
        if not chunk:
            return
        tracked.idle = 0
        *complete, tracked.pending = (tracked.pending + chunk).split(b"\n")
        out.extend((tracked.pid, _text(p)) for line in complete for p in _pieces(line))
        if len(tracked.pending) >= MAX_LINE:  # whole pieces go; the rest waits for more
            cut = len(tracked.pending) - len(tracked.pending) % MAX_LINE
            out.extend((tracked.pid, _text(p)) for p in _pieces(tracked.pending[:cut]))
            tracked.pending = tracked.pending[cut:]

    @staticmethod
    def _flush(tracked: _Tracked, out: list[Line]) -> None:
        if tracked.pending:
            out.extend((tracked.pid, _text(p)) for p in _pieces(tracked.pending))
            tracked.pending = b""
        tracked.idle = 0
