"""What happened, as small immutable records, and the bus that carries them.

Components publish Events; the daemon's printer, the admin API's progress
streams, the history (events.log) and the metrics subscribe. Publishing never blocks and never
fails because of a subscriber. A subscriber that raises is kept (what failed once, a
full disk say, may work at the next event) and reported once through `on_error`: the
others never depend on it.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HISTORY = 1000


class Kind(enum.StrEnum):
    """Every kind of event, declared once: whether it changes what the state file records
    (`saves`: the daemon writes the file after it) and whether the human log leaves it out
    (`quiet`). The value is what events.log, `rotator events` and the JSON log say."""

    saves: bool
    quiet: bool

    def __new__(cls, value: str, saves: bool = True, quiet: bool = False) -> Kind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.saves = saves
        member.quiet = quiet
        return member

    # An instance's life.
    SPAWNED = "spawned"
    HEALTHY = "healthy", False
    WARMED = "warmed", False  # connections opened to it before the switch
    PORT = "port", False  # a port chosen (or skipped) for it
    SOCKET = "socket"  # a stale socket file removed
    SWITCHED = "switched"
    DRAINED = "drained"
    STOPPED = "stopped"
    ADOPTED = "adopted"
    LOG = "log", False  # its log file rotated
    # Supervision.
    CHECK_FAILED = "check_failed", False  # one failed health check of the active instance
    UNHEALTHY = "unhealthy", False  # unhealthy_threshold failed checks: being replaced
    EXITED = "exited"  # it exited on its own: being replaced
    RESTARTING = "restarting"
    BACKOFF = "backoff", False
    # Operations and their outcome.
    START = "start", False  # `start` of a component that already runs
    WAITING = "waiting", False  # for the rotation in progress
    ROTATED = "rotated", False  # a rotation's outcome and duration (the metrics')
    FAILED = "failed"
    DEPLOYED = "deployed"
    VERIFIED = "verified", False
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolledback"
    REMOVED = "removed"  # taken out of the config by a reload
    SCALED = "scaled"  # the replica count changed (`rotator scale`, a reload)
    LIMIT = "limit", False  # an instance passed max_memory or restart_every: being replaced
    CANARY = "canary"  # a canary started
    CANARY_FIGURES = "canary_figures", False, True  # its running comparison
    VERDICT = "verdict"  # a canary promoted or rolled back, and why
    WATCH = "watch", False  # files changed: rotating, not rotating, or the rotation failed
    STATE = "state", True, True  # a component's state changed (said by the event before)
    DAEMON = "daemon", False, True  # the daemon's own record (it printed the line itself)


class Reason(enum.StrEnum):
    """Why a rotation ran: in its `rotated` event and rotator_rotations_total's label."""

    START = "start"  # a first start, `rotator start`, `rotator scale` up
    MANUAL = "manual"  # `rotator restart`
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    RELOAD = "reload"  # a reload that changed the component's definition
    CRASH = "crash"  # an instance exited on its own
    UNHEALTHY = "unhealthy"  # an instance failed unhealthy_threshold checks
    WATCH = "watch"  # a watched file changed
    MEMORY = "memory"  # an instance passed max_memory
    AGE = "age"  # an instance passed restart_every


@dataclass(frozen=True)
class Event:
    component: str
    kind: str  # a Kind; any string in a history written by another version
    message: str  # one human line, without the component name
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "component": self.component,
            "kind": self.kind,
            "message": self.message,
            **self.data,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        """The inverse of to_json (KeyError or TypeError on a record that is not an event)."""
        rest = dict(data)
        time_, component, kind, message = (
            rest.pop(k) for k in ("time", "component", "kind", "message")
        )
        if not isinstance(component, str) or not isinstance(kind, str):
            raise TypeError("component and kind must be strings")
        return cls(component, kind, str(message), rest, float(time_))


Subscriber = Callable[[Event], None]
ErrorHandler = Callable[[Subscriber, Exception], None]


class EventBus:
    def __init__(self, history: int = HISTORY, on_error: ErrorHandler | None = None) -> None:
        self.history: collections.deque[Event] = collections.deque(maxlen=history)
        self._subscribers: list[Subscriber] = []
        self._on_error = on_error
        self._failed: set[int] = set()  # ids of the subscribers already reported

    def publish(self, event: Event) -> None:
        self.history.append(event)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception as exc:  # a broken listener must not break a rotation
                self._report(subscriber, exc)

    def _report(self, subscriber: Subscriber, exc: Exception) -> None:
        if id(subscriber) in self._failed or self._on_error is None:
            return
        self._failed.add(id(subscriber))
        with contextlib.suppress(Exception):
            self._on_error(subscriber, exc)

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        self._subscribers.append(subscriber)
        return lambda: self._unsubscribe(subscriber)

    def _unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)
            self._failed.discard(id(subscriber))  # the id may come back for another
