"""What the daemon remembers across its own death, and the lock that keeps it single.

`StateFile` saves a `State` (which instances of each component serve or are being
drained, as (pid, create_time) identities with their endpoints, plus deployed
definitions and a scaled replica count) atomically
as readable JSON, and loads it back with strict validation. A file that cannot be
trusted (corrupt, wrong shape, a format older than 1) is moved aside and reported as a
`StateError`, so the caller can log it, continue with an empty state, and leave
the instances it named alone; format 1 (one active TCP instance per component, before
Unix-socket instances and replicas were recorded) is still read; a file from a newer rotator (`StateTooNew`) stays
in place. `DaemonLock` is a flock on a file in the state dir: the kernel drops it
when the daemon dies, even by SIGKILL, and the fd is not inherited by instances.
`StateWriter` is how the daemon saves while it serves: off the event loop, one
write at a time, a failure kept, said once and retried.

Only files are touched here. Checking that a recorded process still is the one
we started (pid, create_time, marker), adopting or stopping it, and deciding
when to save are left to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rotator.printer import duration

STATE_VERSION = 2
SOURCES = ("config", "deployed")
# A state file that could not be written is tried again this often (seconds).
STATE_RETRY = 2.0


@dataclass(frozen=True)
class InstanceRecord:
    pid: int
    create_time: float  # psutil.Process(pid).create_time() at spawn; identity = (pid, create_time)
    port: int | None  # where it listens: a port, or (transport: unix) the `socket` path
    marker: str  # ROTATOR_INSTANCE in the instance's environment, unique per instance
    started: float  # unix time
    socket: str | None = None
    replica: int = 0  # the slot it fills among the component's replicas


@dataclass(frozen=True)
class ComponentRecord:
    name: str
    instances: tuple[InstanceRecord, ...] = ()  # in the balancing set when written
    draining: tuple[InstanceRecord, ...] = ()  # being drained/stopped when written
    definition: Mapping[str, Any] | None = None  # {"command", "cwd", "env"}; None = the config's
    definition_source: str = "config"  # "config" | "deployed"
    deployed_at: float | None = None
    previous_definition: Mapping[str, Any] | None = None  # for rollback; None = the config's
    stopped: bool = False  # stopped on purpose with `rotator stop`
    replicas: int | None = None  # set by `rotator scale`; None = the config's count
    # The config's count when `replicas` was set: a file changed since then wins, as a
    # reload that changes `replicas` does.
    replicas_config: int | None = None
    canary: tuple[InstanceRecord, ...] = ()  # a canary's instances, on trial when written

    @property
    def active(self) -> InstanceRecord | None:
        return self.instances[0] if self.instances else None


@dataclass(frozen=True)
class State:
    components: Mapping[str, ComponentRecord]
    daemon_pid: int | None = None
    written_at: float | None = None


class StateError(Exception):
    """The state file cannot be used; the message is one line. `moved_to` is where
    the file was moved aside, or None if it was left in place."""

    def __init__(self, message: str, moved_to: Path | None = None) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
        self.moved_to = moved_to


class StateTooNew(StateError):
    """Written by a newer rotator and left in place: the caller must not overwrite it."""


class _Bad(Exception):
    """A shape problem, found at the place its message starts with."""


_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int, "pid": int, "port": int, "number": (int, float),
    "str": str, "bool": bool, "object": dict, "list": list,
}  # fmt: skip
_INSTANCE = {"pid": "pid", "create_time": "number", "port": "port?", "socket": "str?",
             "marker": "str", "started": "number", "replica": "slot"}  # fmt: skip
_COMPONENT = {"instances": "instances", "draining": "instances", "definition": "definition?",
              "definition_source": "source", "deployed_at": "number?",
              "previous_definition": "definition?", "stopped": "bool",
              "replicas": "count?", "replicas_config": "count?",
              "canary": "instances"}  # fmt: skip
# Format 1: one `active` instance (always on a port), no replicas.
_INSTANCE_1 = {"pid": "pid", "create_time": "number", "port": "port", "marker": "str",
               "started": "number"}  # fmt: skip
_COMPONENT_1 = {"active": "instance1?", "draining": "instances1", "definition": "definition?",
                "definition_source": "source", "deployed_at": "number?",
                "previous_definition": "definition?", "stopped": "bool"}  # fmt: skip
_TOP = {"version": "int", "daemon_pid": "pid?", "written_at": "number?",
        "components": "components"}  # fmt: skip
_TOP_1 = {**_TOP, "components": "components1"}


def _fields(obj: Any, where: str, spec: dict[str, str]) -> dict[str, Any]:
    _value(obj, "object", where)
    if missing := [k for k in spec if k not in obj]:
        raise _Bad(f"{where}: missing key {missing[0]!r}")
    if extra := sorted(set(obj) - set(spec)):
        raise _Bad(f"{where}: unexpected key {extra[0]!r}")
    return {
        k: _value(obj[k], kind, f"{where}.{k}".removeprefix("top level."))
        for k, kind in spec.items()
    }


def _value(value: Any, kind: str, where: str) -> Any:
    if kind.endswith("?"):
        return None if value is None else _value(value, kind[:-1], where)
    if kind in ("instance", "instance1"):
        record = InstanceRecord(
            **_fields(value, where, _INSTANCE_1 if kind[-1] == "1" else _INSTANCE)
        )
        if (record.port is None) == (record.socket is None):
            raise _Bad(f"{where}: needs exactly one of port and socket")
        return record
    if kind in ("instances", "instances1"):
        items = _value(value, "list", where)
        one = "instance1" if kind[-1] == "1" else "instance"
        return tuple(_value(v, one, f"{where}[{i}]") for i, v in enumerate(items))
    if kind in ("components", "components1"):
        return {
            name: _component(name, c, f"components.{name}", kind[-1] == "1")
            for name, c in _value(value, "object", where).items()
        }
    if kind in ("slot", "count"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or not (0 if kind == "slot" else 1) <= value <= 100_000:
            raise _Bad(
                f"{where}: expected a {'replica slot' if kind == 'slot' else 'replica count'}, got {value!r}"
            )
        return value
    if kind == "source":
        if _value(value, "str", where) not in SOURCES:
            raise _Bad(f"{where}: unknown value {value!r}")
        return value
    if kind == "definition":
        _value(value, "object", where)
        for i, word in enumerate(_value(value.get("command", []), "list", f"{where}.command")):
            _value(word, "str", f"{where}.command[{i}]")
        _value(value.get("cwd"), "str?", f"{where}.cwd")
        for key, v in _value(value.get("env", {}), "object", f"{where}.env").items():
            _value(v, "str", f"{where}.env.{key}")
        return dict(value)
    ok = isinstance(value, _TYPES[kind]) and (kind == "bool" or not isinstance(value, bool))
    if not ok:
        raise _Bad(f"{where}: expected {kind}, got {type(value).__name__}")
    if kind == "number" and not (math.isfinite(value) and abs(value) < 1e300):
        raise _Bad(f"{where}: {value} is not a usable number")
    if kind in ("pid", "port") and not 0 < value <= (65535 if kind == "port" else 2**62):
        raise _Bad(f"{where}: {value} is out of range")  # a pid <= 0 would signal a group
    return float(value) if kind == "number" else value


def _component(name: str, doc: Any, where: str, format_1: bool) -> ComponentRecord:
    if not format_1:
        return ComponentRecord(name=name, **_fields(doc, where, _COMPONENT))
    values = _fields(doc, where, _COMPONENT_1)
    active = values.pop("active")
    return ComponentRecord(name=name, instances=(active,) if active else (), **values)


def _json_default(value: object) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, InstanceRecord):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> State:
        """The saved State; an empty one if there is no file. Raises StateError."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return State(components={})
        except OSError as exc:
            raise StateError(f"state file {self.path} cannot be read ({exc.strerror})") from exc
        try:
            doc = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise self._corrupt("not UTF-8 text") from exc
        except json.JSONDecodeError as exc:
            raise self._corrupt(f"line {exc.lineno}: {exc.msg}") from exc
        except (ValueError, RecursionError) as exc:  # e.g. a huge integer, absurd nesting
            raise self._corrupt(str(exc) or type(exc).__name__) from exc
        if not isinstance(doc, dict):
            raise self._corrupt(f"expected a JSON object, got {type(doc).__name__}")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise self._corrupt("version: missing or not an integer")
        if version > STATE_VERSION:
            raise StateTooNew(
                f"state file {self.path} was written by a newer rotator (format {version}; "
                f"this one reads format {STATE_VERSION}); upgrade rotator to use it "
                "(the file was left in place)"
            )
        if version < 1:
            moved = self._move_aside()
            raise StateError(f"state file {self.path} was written by an older rotator "
                             f"(format {version}){self._tail(moved)}", moved)  # fmt: skip
        try:
            top = _fields(doc, "top level", _TOP if version == STATE_VERSION else _TOP_1)
        except _Bad as exc:
            raise self._corrupt(str(exc)) from exc
        return State(top["components"], top["daemon_pid"], top["written_at"])

    def save(self, state: State) -> None:
        """Write atomically (temp file, fsync, replace, fsync dir), mode 0600.
        written_at is filled in with the current time when None."""
        components: dict[str, Any] = {}
        for key, comp in state.components.items():
            if key != comp.name:
                raise ValueError(f"component record {comp.name!r} filed under {key!r}")
            components[key] = {f.name: getattr(comp, f.name) for f in fields(comp)[1:]}  # but name
        doc = {
            "version": STATE_VERSION,
            "daemon_pid": state.daemon_pid,
            "written_at": time.time() if state.written_at is None else state.written_at,
            "components": components,
        }
        text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False, default=_json_default)
        write_private(self.path, text + "\n")

    def _corrupt(self, detail: str) -> StateError:
        moved = self._move_aside()
        return StateError(f"state file {self.path} is corrupt ({detail}){self._tail(moved)}", moved)

    def _tail(self, moved: Path | None) -> str:
        where = f"it was moved aside to {moved}" if moved else "it could not be moved aside"
        return f"; {where}; its pids are not trusted (leftovers of the earlier run are found by their marker)"

    def _move_aside(self) -> Path | None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(100):
            target = self.path.with_name(
                f"{self.path.name}.corrupt-{stamp}" + (f"-{n}" if n else "")
            )
            if target.exists():
                continue
            try:
                os.rename(self.path, target)
            except OSError:
                return None
            return target
        return None


class StateWriter:
    """Saves the daemon's state while it serves. Writes run in a thread: their fsyncs take
    milliseconds that the proxy, on the event loop, must not wait for (they showed as
    gaps at switches). One write at a time; changes during a write cause one more.

    A failed write is kept (`error`, for `status` and for the command that caused it),
    said once (again if the reason changes) and retried every STATE_RETRY seconds until
    one succeeds, which is said too. Nothing is written until `enable()`: a state file
    not yet read must never be overwritten."""

    def __init__(
        self,
        file: StateFile,
        snapshot: Callable[[], State],
        out: Callable[[str], None],
        describe: Callable[[OSError], str] = str,
    ) -> None:
        self.file = file
        self._snapshot = snapshot  # taken on the loop, so it is consistent
        self._out = out
        self._describe = describe
        self.enabled = False
        self.error: dict[str, Any] | None = None  # {"message", "since"} of a failed write
        self._writing: asyncio.Task[None] | None = None
        self._again = False
        self._retry: asyncio.TimerHandle | None = None

    def enable(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def soon(self) -> None:
        if not self.enabled:
            return
        if self._writing is not None and not self._writing.done():
            self._again = True
            return
        self._writing = asyncio.ensure_future(self._write_until_current())

    def now(self) -> None:
        """Write at once, on the loop (startup and shutdown, where nothing else runs)."""
        if self.enabled:
            self._done(self._write(self._snapshot()))

    async def settled(self) -> str | None:
        """Once the changes made so far are written (or failed to be): why the last write
        failed, or None."""
        while self._writing is not None and not self._writing.done():
            await asyncio.wait({self._writing})
        return self.error["message"] if self.error else None

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()

    async def _write_until_current(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._again = False
            self._done(await loop.run_in_executor(None, self._write, self._snapshot()))
            if not self._again:
                return

    def _write(self, state: State) -> OSError | None:
        """In a thread: what went wrong, if anything (the loop reports it)."""
        try:
            self.file.save(state)
        except OSError as exc:
            return exc
        return None

    def _done(self, error: OSError | None) -> None:
        if error is None:
            if self.error is not None:
                self.error = None
                self._out(f"rotator: the state file {self.file.path} is written again")
            return
        message = f"cannot write the state file {self.file.path}: {self._describe(error)}"
        if self.error is None or self.error["message"] != message:
            self._out(
                f"rotator: {message}; what runs is not recorded for a later daemon "
                f"(retrying every {duration(STATE_RETRY)})"
            )
        since = self.error["since"] if self.error else time.time()
        self.error = {"message": message, "since": since}
        if self._retry is None or self._retry.cancelled():
            self._retry = asyncio.get_running_loop().call_later(STATE_RETRY, self._retried)

    def _retried(self) -> None:
        self._retry = None
        if self.error is not None:
            self.soon()


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (temp file, fsync, rename, fsync of the
    directory), readable by its owner only: a crash leaves the old file or the new,
    never half of one."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every platform/filesystem fsyncs a directory
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        super().__init__(
            f"rotator is already running for this state_dir (pid {pid if pid else 'unknown'})"
        )


class DaemonLock:
    """An exclusive flock held for the daemon's life; the file holds the owner's pid."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this DaemonLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # not inheritable (PEP 446)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                for _ in range(10):  # the holder may not have written its pid yet
                    if (pid := _read_pid(fd)) is not None:
                        break
                    time.sleep(0.02)
                os.close(fd)
                raise AlreadyRunning(pid) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):  # else a releasing owner unlinked what we opened
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:  # unlink while still locked, so no one can lock a file on its way out
            if _read_pid(fd) == os.getpid() and _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> DaemonLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None
