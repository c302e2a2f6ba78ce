"""What happened, as small immutable records, and the bus that carries them.

Components publish Events; the daemon's printer, the admin API's progress
streams, the history (events.log) and the metrics subscribe. Publishing never blocks and never
fails because of a subscriber.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HISTORY = 1000


@dataclass(frozen=True)
class Event:
    component: str
    kind: str  # spawned, healthy, switched, drained, stopped, rotated, failed, exited, state...
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


class EventBus:
    def __init__(self, history: int = HISTORY) -> None:
        self.history: collections.deque[Event] = collections.deque(maxlen=history)
        self._subscribers: list[Subscriber] = []

    def publish(self, event: Event) -> None:
        self.history.append(event)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:  # a broken listener must not break a rotation
                self._subscribers.remove(subscriber)

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        self._subscribers.append(subscriber)
        return lambda: (
            self._subscribers.remove(subscriber) if subscriber in self._subscribers else None
        )
